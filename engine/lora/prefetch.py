"""AdapterPrefetcher: adapters read from disk off the engine loop, before their first step. Reading, converting and
checking a 7B-shape adapter took ~0.2 s inside a step, holding every stream; here a small thread pool reads it
(one read per adapter at a time) from the moment its request arrives, the scheduler leaves that adapter's
requests waiting until ready() (the others go on), and the step only copies host weights into a device slot.

Threads run LoRAManager.read alone; the host cache, the slots and the failed adapters change only on the engine
loop (collect, ready). Rank 0's reads only: with tensor parallel the other ranks read inside their step."""
from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from engine.lora.adapter import LoRAError, LoRAModel, check_adapter_files
from engine.lora.manager import LoRAManager
from engine.lora.request import LoRARequest

logger = logging.getLogger("gantry.engine")

NUM_READ_THREADS = 2  # reads at once (each mostly in torch and safetensors, which release the GIL)


class AdapterPrefetcher:
    def __init__(self, manager: LoRAManager):
        self.manager = manager
        self.pool = ThreadPoolExecutor(NUM_READ_THREADS, thread_name_prefix="gantry-lora-read")
        # lora_int_id -> its read, running or done and not yet collected; at most max_cpu_loras (host copies)
        self.reads: dict[int, tuple[LoRARequest, Future[LoRAModel]]] = {}

    def start(self, req: LoRARequest) -> None:
        """Begin reading req's adapter unless a slot or the host cache holds it, it is being read, or max_cpu_loras
        reads are out already (ready() starts it later)."""
        m, lora_id = self.manager, req.lora_int_id
        if lora_id in self.reads or lora_id in m.failed or len(self.reads) >= m.max_cpu_loras or m.resident(lora_id):
            return
        self.reads[lora_id] = (req, self.pool.submit(m.read, req))

    def collect(self) -> None:
        """Finished reads into the host cache (before a step is scheduled: what the step checks as ready() stays
        there until its slot copy); a read that failed to the manager's failed adapters, whose requests the engine
        core fails alone, with the error the step's own read gave (LoRAError naming model and the file). The files
        are looked at again here, where the step read them before: removed since the request arrived, they fail
        it as they did, whenever the read ran."""
        for lora_id, (req, future) in list(self.reads.items()):
            if not future.done():
                continue
            del self.reads[lora_id]
            try:
                check_adapter_files(req.lora_path, self.manager.max_lora_rank, "model")
                self.manager.admit(future.result())
            except LoRAError as e:
                logger.warning("LoRA adapter %s (id %d) could not be read: %s", req.lora_name, lora_id, e)
                self.manager.failed[lora_id] = e

    def ready(self, req: LoRARequest) -> bool:
        """Whether a step may use req's adapter now (a slot or the host cache holds it); if not, its read is started
        or under way, or it failed (its requests are about to fail)."""
        if self.manager.resident(req.lora_int_id):
            return True
        self.start(req)
        return False

    def wait(self, timeout: float) -> None:
        """Block until a read finishes, at most timeout seconds (none out: return at once): the engine loop's
        pause when nothing else can run, instead of spinning against the reads for the GIL."""
        if self.reads:
            wait([f for _, f in self.reads.values()], timeout, FIRST_COMPLETED)

    def shutdown(self) -> None:
        """Cancel the reads not begun, wait for those under way (a fraction of a second each)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reads.clear()
