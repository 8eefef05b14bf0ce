/* Gantry chat: conversations (localStorage), settings, the message thread and streaming answers.
   Every message is rendered through textContent or GantryMarkdown (DOM nodes, never HTML strings).
   The server is reached through GantryAPI only: /v1/models, /v1/chat/completions, /ui/status. */
"use strict";

(function () {
  const API = window.GantryAPI;
  const Markdown = window.GantryMarkdown;
  const $ = (id) => document.getElementById(id);
  const STORE = { chats: "gantry.chats.v1", settings: "gantry.settings.v1", theme: "gantry.theme" };
  const DEFAULTS = { system: "", temperature: "0.7", top_p: "1", max_tokens: "", model: "" };
  const NEW_TITLE = "New chat";

  let chats = load(STORE.chats, { current: null, list: [] });
  let settings = Object.assign({}, DEFAULTS, load(STORE.settings, {}));
  let models = [];
  let generating = null; // {chat, message, controller} while an answer streams
  let renderQueued = false;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function load(key, fallback) {
    try { return JSON.parse(localStorage.getItem(key)) || fallback; } catch (e) { return fallback; }
  }

  function save() {
    try {
      localStorage.setItem(STORE.chats, JSON.stringify(chats));
      localStorage.setItem(STORE.settings, JSON.stringify(settings));
    } catch (e) { /* full or disabled storage: the page keeps working, unsaved */ }
  }

  // ---- conversations ----

  function current() {
    let chat = chats.list.find((c) => c.id === chats.current);
    if (!chat) chat = newChat();
    return chat;
  }

  function newChat() {
    const empty = chats.list.find((c) => c.messages.length === 0);
    const chat = empty || { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8),
                            title: NEW_TITLE, updated: Date.now(), messages: [] };
    if (!empty) chats.list.unshift(chat);
    chats.current = chat.id;
    return chat;
  }

  function renderConversations() {
    const list = $("conversations");
    list.replaceChildren();
    for (const chat of [...chats.list].sort((a, b) => b.updated - a.updated)) {
      const li = el("li", "conversation" + (chat.id === chats.current ? " active" : ""));
      const open = el("button", "conversation-title", chat.title);
      open.type = "button";
      open.title = chat.title;
      open.addEventListener("click", () => { if (!generating) { chats.current = chat.id; save(); closeSidebar(); renderAll(); } });
      const del = el("button", "conversation-delete", "\u00d7");
      del.type = "button";
      del.setAttribute("aria-label", "Delete conversation " + chat.title);
      del.addEventListener("click", () => {
        if (generating && generating.chat === chat) return;
        chats.list = chats.list.filter((c) => c !== chat);
        save();
        renderAll();
      });
      li.append(open, del);
      list.appendChild(li);
    }
  }

  // ---- the thread ----

  function statsText(s) {
    const parts = [];
    if (s.ttft_s !== undefined) parts.push(["stat-ttft", "TTFT " + s.ttft_s.toFixed(2) + " s"]);
    if (s.tokens_per_s !== undefined) parts.push(["stat-speed", s.tokens_per_s.toFixed(1) + " tok/s"]);
    if (s.completion_tokens !== undefined) {
      parts.push(["stat-tokens", s.prompt_tokens + " prompt + " + s.completion_tokens + " completion tokens"]);
    } else if (s.approx_tokens) {
      parts.push(["stat-tokens", "\u2248" + s.approx_tokens + " tokens"]);
    }
    return parts;
  }

  function actionButton(label, className, onClick) {
    const b = el("button", "action " + className, label);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function messageNode(chat, m, index) {
    const node = el("div", "msg " + m.role + (m.pending ? " pending" : ""));
    node.dataset.index = String(index);
    const bubble = el("div", "bubble");
    if (m.role === "user") {
      bubble.appendChild(el("div", "user-text", m.content));
      node.appendChild(bubble);
      return node;
    }
    if (m.reasoning) {
      const details = el("details", "reasoning");
      details.open = m.reasoningOpen !== undefined ? m.reasoningOpen : m.pending && !m.content;
      const summary = el("summary", null, m.pending && !m.content ? "Thinking\u2026" : "Reasoning");
      // The reader's choice sticks (a click, or Enter on the summary); until then it follows the stream.
      summary.addEventListener("click", () => { m.reasoningOpen = !details.open; });
      details.appendChild(summary);
      const body = el("div", "md reasoning-body");
      body.appendChild(Markdown.render(m.reasoning));
      details.appendChild(body);
      bubble.appendChild(details);
    }
    const content = el("div", "md content");
    content.appendChild(Markdown.render(m.content));
    if (m.pending && !m.content && !m.reasoning) content.appendChild(el("span", "typing", "\u2022\u2022\u2022"));
    bubble.appendChild(content);
    if (m.error) bubble.appendChild(el("div", "msg-error", m.error));
    node.appendChild(bubble);
    if (!m.pending) {
      const meta = el("div", "meta");
      const stats = meta.appendChild(el("div", "meta-stats"));
      if (m.stopped) stats.appendChild(el("span", "badge", "stopped"));
      if (m.finish_reason === "length") stats.appendChild(el("span", "badge", "max tokens reached"));
      for (const [cls, text] of statsText(m.stats || {})) stats.appendChild(el("span", "stat " + cls, text));
      if (m.model) stats.appendChild(el("span", "stat stat-model", m.model));
      const actions = meta.appendChild(el("div", "meta-actions"));
      actions.appendChild(actionButton("Copy", "copy", (e) => copy(m.content, e.currentTarget)));
      if (index === chat.messages.length - 1) actions.appendChild(actionButton("Regenerate", "regenerate", regenerate));
      node.appendChild(meta);
    }
    return node;
  }

  function nearBottom() {
    const box = $("messages");
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function renderThread() {
    const chat = current();
    const thread = $("thread");
    thread.replaceChildren(...chat.messages.map((m, i) => messageNode(chat, m, i)));
    $("empty").hidden = chat.messages.length > 0;
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  /** Re-renders the streaming answer at most once per frame. */
  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      if (!generating || generating.chat !== current()) return;
      const stick = nearBottom();
      const index = generating.chat.messages.indexOf(generating.message);
      const old = $("thread").children[index];
      if (old) old.replaceWith(messageNode(generating.chat, generating.message, index));
      if (stick) $("messages").scrollTop = $("messages").scrollHeight;
    });
  }

  function renderAll() {
    renderConversations();
    renderThread();
    $("empty-model").textContent = settings.model || (models[0] && models[0].id) || "the model";
  }

  // ---- generation ----

  function requestBody(chat) {
    const messages = [];
    if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
    for (const m of chat.messages) {
      if (m.role === "user" || (m.role === "assistant" && !m.error && m.content)) messages.push({ role: m.role, content: m.content });
    }
    const body = { model: $("model").value || undefined, messages, stream: true, stream_options: { include_usage: true } };
    for (const [field, text] of [["temperature", settings.temperature], ["top_p", settings.top_p], ["max_tokens", settings.max_tokens]]) {
      if (String(text).trim() !== "") body[field] = Number(text); // the server names a bad value
    }
    return body;
  }

  async function generate(chat) {
    const message = { role: "assistant", content: "", reasoning: "", pending: true, model: $("model").value };
    chat.messages.push(message);
    chat.updated = Date.now();
    generating = { chat, message, controller: new AbortController() };
    setBusy(true);
    renderAll();
    const t0 = performance.now();
    let tFirst = null;
    let usage = null;
    let chunks = 0;
    let lastSave = t0;
    try {
      const resp = await API.request("/v1/chat/completions", { method: "POST", body: JSON.stringify(requestBody(chat)),
                                                              signal: generating.controller.signal });
      if (!resp.ok) {
        message.error = await API.errorMessage(resp);
        if (resp.status === 401) API.askKey(message.error).then(loadModels);
      } else {
        for await (const data of API.sseData(resp)) {
          if (data === "[DONE]") break;
          const event = JSON.parse(data);
          if (event.error) { message.error = event.error.message; break; }
          if (event.usage) usage = event.usage;
          const choice = (event.choices && event.choices[0]) || {};
          if (choice.finish_reason) message.finish_reason = choice.finish_reason;
          const delta = choice.delta || {};
          const reasoning = delta.reasoning_content || delta.reasoning;
          if (delta.content || reasoning) {
            if (tFirst === null) tFirst = performance.now();
            message.content += delta.content || "";
            message.reasoning += reasoning || "";
            chunks++;
            queueRender();
            if (performance.now() - lastSave > 1000) { save(); lastSave = performance.now(); }
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") message.stopped = true;
      else message.error = "the connection failed: " + e.message;
    }
    const tEnd = performance.now();
    const stats = {};
    if (tFirst !== null) stats.ttft_s = (tFirst - t0) / 1000;
    if (usage) {
      stats.prompt_tokens = usage.prompt_tokens;
      stats.completion_tokens = usage.completion_tokens;
      if (tFirst !== null && usage.completion_tokens > 1 && tEnd > tFirst) {
        stats.tokens_per_s = (usage.completion_tokens - 1) / ((tEnd - tFirst) / 1000); // decode speed
      }
    } else if (chunks) {
      stats.approx_tokens = chunks; // stopped: no usage, one chunk per step and token
    }
    message.stats = stats;
    message.pending = false;
    generating = null;
    setBusy(false);
    save();
    renderAll();
    API.refreshStatus();
  }

  async function send(text) {
    if (generating) return;
    const chat = current();
    chat.messages.push({ role: "user", content: text });
    if (chat.title === NEW_TITLE) chat.title = text.replace(/\s+/g, " ").trim().slice(0, 60) || NEW_TITLE;
    await generate(chat);
  }

  function regenerate() {
    const chat = current();
    if (generating || !chat.messages.length || chat.messages[chat.messages.length - 1].role !== "assistant") return;
    chat.messages.pop();
    generate(chat);
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("new-chat").disabled = busy;
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) { // no clipboard API outside secure contexts (plain http on another host)
      const area = el("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1200);
  }

  // ---- models, settings, theme, layout ----

  let modelsLoading = null;

  /** Fills the model picker from /v1/models (base models, then LoRA adapters); one call at a time. */
  function loadModels() {
    if (!modelsLoading) modelsLoading = fetchModels().finally(() => { modelsLoading = null; });
    return modelsLoading;
  }

  async function fetchModels() {
    try {
      const resp = await API.request("/v1/models");
      if (resp.status === 401) {
        const message = await API.errorMessage(resp);
        API.askKey(message).then(loadModels); // after the key, outside this call
        return;
      }
      if (!resp.ok) return;
      models = (await resp.json()).data || [];
    } catch (e) {
      return;
    }
    const select = $("model");
    const bases = models.filter((m) => !m.parent);
    const adapters = models.filter((m) => m.parent);
    const option = (m, label) => { const o = el("option", null, label); o.value = m.id; return o; };
    select.replaceChildren(...bases.map((m) => option(m, m.id)));
    if (adapters.length) {
      const group = el("optgroup");
      group.label = "LoRA adapters";
      adapters.forEach((m) => group.appendChild(option(m, m.id + " (on " + m.parent + ")")));
      select.appendChild(group);
    }
    if (models.some((m) => m.id === settings.model)) select.value = settings.model;
    renderAll();
  }

  const FIELDS = [["system-prompt", "system"], ["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]];

  function setUpSettings() {
    for (const [id, key] of FIELDS) {
      $(id).value = settings[key];
      $(id).addEventListener("input", () => { settings[key] = $(id).value; save(); });
    }
    $("reset-settings").addEventListener("click", () => {
      settings = Object.assign({}, DEFAULTS, { model: settings.model });
      FIELDS.forEach(([id, key]) => { $(id).value = settings[key]; });
      save();
    });
    $("settings-toggle").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("change-key").addEventListener("click", () => API.askKey("").then(loadModels));
    $("model").addEventListener("change", () => { settings.model = $("model").value; save(); renderAll(); });
  }

  function setUpTheme() {
    $("theme").addEventListener("click", () => {
      const next = document.documentElement.getAttribute("data-theme") === "dark" ? "light" : "dark";
      document.documentElement.setAttribute("data-theme", next);
      try { localStorage.setItem(STORE.theme, next); } catch (e) { /* this page only */ }
    });
  }

  function closeSidebar() {
    $("sidebar").classList.remove("open");
    $("scrim").hidden = true;
  }

  function setUpLayout() {
    $("menu").addEventListener("click", () => {
      $("sidebar").classList.add("open");
      $("scrim").hidden = false;
    });
    $("scrim").addEventListener("click", closeSidebar);
    $("new-chat").addEventListener("click", () => { newChat(); save(); closeSidebar(); renderAll(); $("prompt").focus(); });
    const prompt = $("prompt");
    const grow = () => { prompt.style.height = "auto"; prompt.style.height = prompt.scrollHeight + "px"; };
    prompt.addEventListener("input", grow);
    prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
    });
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = prompt.value;
      if (!text.trim() || generating) return;
      prompt.value = "";
      grow();
      send(text);
    });
    $("stop").addEventListener("click", () => { if (generating) generating.controller.abort(); });
    $("thread").addEventListener("click", (e) => { // code blocks' own Copy buttons
      const button = e.target.closest(".copy-code");
      if (button) copy(button.closest(".codeblock").querySelector("code").textContent, button);
    });
    window.addEventListener("pagehide", save);
  }

  function start() {
    for (const chat of chats.list) { // a page closed while an answer streamed
      for (const m of chat.messages) if (m.pending) { m.pending = false; m.stopped = true; }
    }
    API.setUpKeyDialog();
    setUpSettings();
    setUpTheme();
    setUpLayout();
    renderAll();
    API.pollStatus((status) => { if (status.status === "ready" && !models.length) loadModels(); }, () => !!generating);
  }

  start();
})();
