/* Gantry chat: the page's only way to the server. fetch() with the API key (sessionStorage only),
   the key dialog that shows the server's own error, the SSE reader of streamed chat completions and
   the status strip polling /ui/status. Exposes window.GantryAPI for app.js. */
"use strict";

(function () {
  const KEY_STORAGE = "gantry.apiKey";
  const $ = (id) => document.getElementById(id);
  let keyWaiters = []; // resolved once a key the server accepts is entered
  let needKey = false;
  let askedOnce = false; // the first 401 opens the dialog by itself; later ones wait for a click

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORAGE); } catch (e) { return null; }
  }

  /** fetch() on this server, with `Authorization: Bearer` when a key was entered. */
  function request(path, options) {
    const opts = options || {};
    const headers = Object.assign({}, opts.headers || {});
    const key = storedKey();
    if (key) headers.Authorization = "Bearer " + key;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, Object.assign({}, opts, { headers, cache: "no-store" }));
  }

  /** The server's error message (OpenAI's {"error": {"message"}}), else the HTTP status. */
  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && typeof body.error.message === "string") return body.error.message;
    } catch (e) { /* not JSON: fall through */ }
    return "HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : "");
  }

  // ---- the key dialog ----

  /** Opens the key dialog (with `message` as the error shown, if any); resolves once a key works. */
  function askKey(message) {
    needKey = true;
    askedOnce = true;
    const dialog = $("key-dialog");
    const error = $("key-error");
    error.hidden = !message;
    error.textContent = message || "";
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  async function submitKey(event) {
    event.preventDefault();
    const input = $("key-input");
    const error = $("key-error");
    const key = input.value.trim();
    if (!key) {
      error.textContent = "enter the server's API key";
      error.hidden = false;
      return;
    }
    try { sessionStorage.setItem(KEY_STORAGE, key); } catch (e) { /* kept for this page only */ }
    $("key-submit").disabled = true;
    try {
      const resp = await request("/v1/models");
      if (resp.status === 401 || resp.status === 400) {
        error.textContent = await errorMessage(resp); // the server says why (wrong key, not UTF-8...)
        error.hidden = false;
        input.select();
        return;
      }
    } catch (e) {
      error.textContent = "cannot send this key: " + e.message; // fetch refuses non-Latin-1 header values
      error.hidden = false;
      return;
    } finally {
      $("key-submit").disabled = false;
    }
    needKey = false;
    input.value = "";
    $("key-dialog").close();
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
  }

  function setUpKeyDialog() {
    $("key-form").addEventListener("submit", submitKey);
    $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  }

  // ---- streamed chat completions ----

  /** The `data:` payloads of a server-sent event stream, as strings; UTF-8 split over chunks is kept whole. */
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(0), { stream: !done });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "").replace(/\r$/, "")).join("\n");
        if (data) yield data;
      }
      if (done) return;
    }
  }

  // ---- the status strip ----

  const STATUS_FIELDS = [
    ["model", "model", (s) => s.model || "\u2014"],
    ["context", "context", (s) => (s.max_model_len ? s.max_model_len.toLocaleString("en-US") + " tokens" : "\u2014")],
    ["running", "running", (s) => String(s.num_requests_running)],
    ["waiting", "waiting", (s) => String(s.num_requests_waiting)],
    ["kv", "KV cache", (s) => (100 * s.kv_cache_usage).toFixed(1) + "%"],
  ];

  function showStatus(kind, text, status) {
    const strip = $("status");
    strip.dataset.state = kind;
    strip.classList.toggle("clickable", kind === "key");
    const items = [];
    const label = document.createElement("span");
    label.className = "status-state";
    label.id = "status-state";
    label.textContent = text;
    items.push(label);
    if (status) {
      for (const [id, name, value] of STATUS_FIELDS) {
        const item = document.createElement("span");
        item.className = "stat stat-" + id;
        const n = document.createElement("span");
        n.className = "stat-label";
        n.textContent = name;
        const v = document.createElement("b");
        v.id = "status-" + id;
        v.textContent = value(status);
        item.append(n, " ", v);
        items.push(item);
      }
    }
    const dot = document.createElement("span");
    dot.className = "dot";
    strip.replaceChildren(dot, ...items);
  }

  let statusTimer = null;
  let statusTick = null;

  /** Polls /ui/status forever; onStatus(status) after every good answer. */
  function pollStatus(onStatus, busy) {
    $("status").addEventListener("click", () => { if (needKey) askKey(""); });
    const tick = statusTick = async () => {
      clearTimeout(statusTimer);
      try {
        const resp = await request("/ui/status");
        if (resp.status === 401) {
          needKey = true;
          showStatus("key", "API key needed \u2014 click to enter it");
          if (!askedOnce) askKey("");
        } else if (!resp.ok) {
          showStatus("error", await errorMessage(resp));
        } else {
          const status = await resp.json();
          showStatus(status.status === "ready" ? "ready" : "busy", status.status, status);
          onStatus(status);
        }
      } catch (e) {
        showStatus("error", "server unreachable");
      }
      statusTimer = setTimeout(tick, document.hidden ? 10000 : busy() ? 1000 : 2000);
    };
    tick();
  }

  /** Polls now (an answer just ended: the strip should not show it running for two more seconds). */
  function refreshStatus() {
    if (statusTick) statusTick();
  }

  window.GantryAPI = { request, errorMessage, askKey, setUpKeyDialog, sseData, pollStatus, refreshStatus,
                       hasKey: () => !!storedKey(), needsKey: () => needKey };
})();
