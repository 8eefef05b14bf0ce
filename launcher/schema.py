"""Dataclass schemas of the launcher's Hydra config, registered in Hydra's ConfigStore.

One group per axis (model, parallel, deploy, engine, server); deploy has one schema per
target, selected by the deploy/*.yaml files through `/schema/deploy/<target>`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

GENERATION_CONFIG_WORDS = ("auto", "vllm")  # model.generation_config values that are not a directory


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used in job and container names
    path: Optional[str] = None  # local directory or .gguf file, or a Hugging Face hub id (org/name); null: the embedded SmolLM2
    local_dir: Optional[str] = None  # for a hub id: directory holding its weights; default <models_dir>/<hub id>
    tokenizer: Optional[str] = None  # tokenizer directory or .gguf; null: the model's own
    served_model_name: Optional[str] = None  # name clients use in the API; null: the hub id, else the engine's default
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    max_model_len: Optional[int] = None  # context length; null: the model's max_position_embeddings
    load_format: str = "auto"  # auto | safetensors | gguf | dummy (random weights, for tests)
    quantization: str = "auto"  # auto (from the checkpoint) | gguf | gptq | awq | compressed-tensors | fp8 | none
    hf_overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to override (tiny dummy shapes)
    generation_config: str = "auto"  # request defaults: auto (the model's generation_config.json) | vllm (none) | a directory
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # on top, e.g. {temperature: 0.6, max_new_tokens: 512}
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapters by name: name -> directory (engine.enable_lora)
    reasoning_parser: Optional[str] = None  # deepseek_r1 | qwen3: <think> text to message.reasoning_content
    tool_call_parser: Optional[str] = None  # hermes | llama3_json | mistral: the model's tool-call format
    architecture: Optional[str] = None  # HF architectures entry, for the reader (e.g. Qwen2ForCausalLM)
    num_attention_heads: Optional[int] = None  # HF config value, checked against tensor parallel size
    num_key_value_heads: Optional[int] = None  # HF config value, checked against tensor parallel size
    num_hidden_layers: Optional[int] = None  # HF config value, checked against pipeline parallel size
    max_position_embeddings: Optional[int] = None  # HF config value, the upper bound of max_model_len


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks that split each layer
    pipeline_parallel_size: int = 1  # ranks that split the layer stack
    nnodes: int = 1  # machines (pods, containers, Slurm nodes) in the torchrun group
    gpus_per_node: int = 1  # ranks per machine: GPUs, or processes when engine.device=cpu
    master_port: int = 29500  # TCP port of the rendezvous on node 0 (multi-node)


@dataclass
class EngineOptions:
    block_size: int = 16  # tokens per KV cache page
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights + KV pool)
    kv_cache_memory_gib: Optional[float] = None  # fixed KV pool size; null: sized from memory (2 GiB on CPU)
    num_kv_blocks: Optional[int] = None  # fixed number of KV pages (tests)
    max_num_seqs: int = 256  # most requests running at once
    max_num_batched_tokens: Optional[int] = None  # token budget per step; null: max(8192, block_size)
    max_prefill_tokens_while_decoding: Optional[int] = None  # prompt tokens per step while others decode; null: 4608 served (latency); 0: prefill first
    enable_prefix_caching: bool = True  # share KV pages of identical prompt prefixes
    enforce_eager: bool = False  # never capture CUDA graphs
    kv_cache_dtype: str = "auto"  # auto (model dtype) | fp8 | fp8_e4m3: FP8 KV pages, twice the tokens (GPU >= sm_89)
    device: str = "auto"  # auto | cuda | cpu (cpu: no GPU flags are rendered, ranks use gloo)
    pipeline_parallel_lanes: Optional[int] = None  # batches in flight with pp > 1; null: pp size
    async_scheduling: Optional[bool] = None  # schedule step t+1 while step t runs; null: on for GPUs without pipeline parallel
    seed: int = 0  # seed for dummy weights and for requests that set no seed
    distributed_timeout_s: float = 60.0  # a collective waiting longer than this means a dead rank
    enable_lora: bool = False  # serve PEFT LoRA adapters (model.lora_modules, or loaded at run time)
    max_loras: int = 1  # adapters resident on the GPU at once (and so in one step)
    max_cpu_loras: Optional[int] = None  # adapters cached in host memory; null: max_loras
    max_lora_rank: int = 16  # largest adapter rank served
    trust_remote_code: bool = False  # let transformers run the model directory's own config/tokenizer code (vLLM's)
    max_logprobs: int = 20  # most logprobs and prompt_logprobs a request may ask for (vLLM's; 20 at most)


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"  # address the API listens on, inside the container or pod
    port: int = 8000  # port the API listens on
    api_key: Optional[str] = None  # the key itself; discouraged: it is then written into the job files
    api_key_env: Optional[str] = "GANTRY_API_KEY"  # environment variable holding the key (null and no other source: no auth)
    api_key_file: Optional[str] = None  # file holding the key (wins over api_key_env)
    api_key_secret: str = "gantry-api-key"  # deploy=k8s: name of the Secret holding the key
    api_key_secret_key: str = "api-key"  # deploy=k8s: key of the key inside that Secret
    metrics_require_key: bool = False  # guard /metrics with the API key too
    max_waiting_requests: int = 1024  # beyond this many waiting requests, answer 503
    max_request_body_bytes: int = 8388608  # larger request bodies get 413
    shutdown_grace_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    log_requests: bool = True  # one info line per finished request
    ui: bool = True  # serve the built-in chat page at / and /ui (public; the chat itself needs the key)
    api_server_count: int = 1  # API processes on rank 0 sharing the port and the one engine core
    engine_hang_timeout_s: float = 60.0  # no engine step for this long while it has work: 503, then exit 1
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with the key)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs model.tool_call_parser)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS: origins browsers may call the API from (*: any)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])  # CORS: methods a cross-origin request may use
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])  # CORS: headers a cross-origin request may send
    allow_credentials: bool = False  # CORS: browsers may send cookies and auth headers cross-origin


@dataclass
class DeployConfig:
    target: str = MISSING  # local | docker | slurm | k8s
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every rank (NCCL_NVLS_ENABLE=0, HF_ENDPOINT, ...)
    module: str = "engine.serve"  # module every rank runs (python -m); tests substitute a stand-in


@dataclass
class LocalDeploy(DeployConfig):
    target: str = "local"  # run torchrun here, in the foreground
    python: Optional[str] = None  # interpreter that runs torchrun; null: the launcher's own
    cuda_visible_devices: Optional[str] = None  # GPUs to use, e.g. "0,1"; null: inherit
    node_rank: Optional[int] = None  # multi-node only: this machine's rank in the group
    master_addr: Optional[str] = None  # multi-node only: address of node 0
    stop_timeout_s: float = 90.0  # after Ctrl-C/SIGTERM, how long the ranks may take before SIGKILL


@dataclass
class DockerDeploy(DeployConfig):
    target: str = "docker"  # one `docker run` script per node
    image: str = "gantry:latest"  # image built from docker/Dockerfile
    pull: str = "missing"  # docker run --pull: missing | never | always
    python: str = "python3"  # interpreter inside the image (the container's entrypoint)
    container_name: Optional[str] = None  # null: the job name
    cuda_visible_devices: Optional[str] = None  # GPUs the container sees; null: 0..gpus_per_node-1
    torch_cuda_arch_list: Optional[str] = None  # TORCH_CUDA_ARCH_LIST for kernels compiled at run time, e.g. "8.0"
    model_mount: str = "/models"  # where the model directory is mounted inside the container
    volumes: list[str] = field(default_factory=list)  # extra -v host:container[:mode] mounts
    host_port: int = 8000  # host port published for the API (single node without network_host)
    network_host: bool = False  # --network host (always on for several nodes): the API binds the host's server.port
    shm_size: str = "64g"  # --shm-size of the container
    ipc_host: bool = True  # --ipc=host (shared memory between ranks and NCCL)
    detach: bool = True  # docker run -d; false keeps the container in the foreground
    restart: str = "no"  # --restart policy: no | on-failure | always | unless-stopped
    master_addr: Optional[str] = None  # multi-node: address of node 0 as the other nodes reach it
    health_interval_s: int = 30  # health check (GET /ready) period
    health_start_period_s: int = 1800  # grace before failed health checks count (model load)


@dataclass
class SlurmDeploy(DeployConfig):
    target: str = "slurm"  # one sbatch job; srun starts one torchrun per node
    partition: Optional[str] = None  # --partition; null: the cluster's default
    account: Optional[str] = None  # --account; null: omitted
    qos: Optional[str] = None  # --qos; null: omitted
    time: str = "24:00:00"  # --time limit of the job
    cpus_per_task: int = 16  # --cpus-per-task (one task per node)
    mem: str = "64G"  # --mem per node ("0": all of it)
    exclusive: bool = False  # --exclusive nodes
    constraint: Optional[str] = None  # --constraint; null: omitted
    extra_sbatch: list[str] = field(default_factory=list)  # further #SBATCH options, e.g. --reservation=x
    python: Optional[str] = None  # interpreter on the nodes; null: python3 after setup lines, else this venv's
    setup: list[str] = field(default_factory=list)  # shell lines run first on every node (module load ...)
    master_addr_command: str = "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1"  # prints node 0's name


@dataclass
class K8sStorage:
    kind: str = "hostPath"  # hostPath | pvc | none (embedded model)
    pvc_name: Optional[str] = None  # pvc: name of the PersistentVolumeClaim with the weights
    sub_path: str = ""  # pvc: directory of the weights inside the claim
    read_only: bool = True  # mount the weights read-only


@dataclass
class K8sDeploy(DeployConfig):
    target: str = "k8s"  # Deployment + Service (one node) or StatefulSet + headless Service
    image: str = "gantry:latest"  # image built from docker/Dockerfile
    image_pull_policy: str = "IfNotPresent"  # Always | IfNotPresent | Never
    python: str = "python3"  # interpreter inside the image
    namespace: str = "default"  # namespace of every object
    storage: K8sStorage = field(default_factory=K8sStorage)  # where the weights come from
    model_mount: str = "/models"  # where the weights are mounted in the pod
    shm_size: str = "64Gi"  # size of the memory-backed /dev/shm
    cpu: str = "8"  # cpu request and limit per pod
    memory: str = "64Gi"  # memory request and limit per pod
    service_type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer
    startup_timeout_s: int = 3600  # how long the model may take to load before the pod is restarted
    service_monitor: bool = False  # also render a Prometheus-operator ServiceMonitor
    service_monitor_labels: dict[str, str] = field(default_factory=lambda: {"release": "prometheus"})  # labels the Prometheus selects on
    node_selector: dict[str, str] = field(default_factory=dict)  # pod nodeSelector
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # pod tolerations
    runtime_class_name: Optional[str] = None  # e.g. nvidia; null: the cluster's default


@dataclass
class GantryConfig:
    model: ModelConfig = MISSING  # what to serve
    parallel: ParallelConfig = MISSING  # how it is split over GPUs and nodes
    deploy: DeployConfig = MISSING  # where it runs (one schema per target)
    engine: EngineOptions = MISSING  # engine tuning
    server: ServerOptions = MISSING  # HTTP API
    job_name: str = "gantry-${model.name}"  # names the job, containers, pods (sanitised to a DNS label)
    output_dir: str = "jobs"  # root of job directories: <output_dir>/<job_name>/<time>
    models_dir: str = "~/models"  # default home of hub models' weights: <models_dir>/<org>/<name>
    submit: Optional[bool] = None  # run what was rendered; null: only deploy=local runs


def register() -> None:
    """Store the schemas: `gantry_schema` for config.yaml and `schema/deploy/<target>`."""
    cs = ConfigStore.instance()
    cs.store(name="gantry_schema", node=GantryConfig)
    for name, node in (("local", LocalDeploy), ("docker", DockerDeploy), ("slurm", SlurmDeploy), ("k8s", K8sDeploy)):
        cs.store(group="schema/deploy", name=name, node=node)
