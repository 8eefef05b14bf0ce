/* Gantry chat: a small, safe Markdown renderer. It builds DOM nodes and sets only textContent and
   checked attributes: nothing the model or the user writes is ever parsed as HTML. Subset: fenced and
   inline code, headings, bold, italic, strikethrough, lists, quotes, tables, rules, http(s) links. */
"use strict";

(function () {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w#+.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const BULLET = /^( *)[-*+]\s+(.*)$/;
  const ORDERED = /^( *)(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
  const MAX_DEPTH = 8; // nested quotes, lists and emphasis beyond this are plain text
  // Leftmost match wins; at one position the first alternative does. Groups: 1-2 code span,
  // 3-4 link, 5 bare URL, 6 and 7 bold, 8 strikethrough, 9 and 10 italic.
  const INLINE = new RegExp([
    "(`+)([\\s\\S]*?[^`])\\1(?!`)",
    "\\[([^\\[\\]\\n]+)\\]\\(\\s*([^\\s()]*(?:\\([^\\s()]*\\)[^\\s()]*)*)(?:\\s+\"[^\"\\n]*\")?\\s*\\)",
    "(https?:\\/\\/[^\\s<>]*[^\\s<>.,;:!?'\")\\]*_~`])",
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",
    "(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",
    "~~(?=\\S)([\\s\\S]*?\\S)~~",
    "\\*([^\\s*]|[^\\s*][\\s\\S]*?[^\\s*])\\*",
    "(?<!\\w)_([^\\s_]|[^\\s_][\\s\\S]*?[^\\s_])_(?!\\w)",
  ].join("|"), "g");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** An absolute http(s) URL as the browser parses it, or null: javascript:, data: and the rest are text. */
  function safeUrl(raw) {
    try {
      const url = new URL(raw);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(text, href, parent, depth) {
    const a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    inline(text, a, depth + 1, true);
    parent.appendChild(a);
  }

  /** Appends the inline Markdown of `text` to `parent`; inLink: no links inside a link. */
  function inline(text, parent, depth, inLink) {
    if (depth > MAX_DEPTH) {
      parent.appendChild(document.createTextNode(text));
      return;
    }
    const re = new RegExp(INLINE.source, "g");
    let pos = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > pos) parent.appendChild(document.createTextNode(text.slice(pos, m.index)));
      pos = re.lastIndex;
      if (m[1] !== undefined) {
        parent.appendChild(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
      } else if (m[3] !== undefined) {
        const href = inLink ? null : safeUrl(m[4]);
        if (href) link(m[3], href, parent, depth);
        else parent.appendChild(document.createTextNode(m[0])); // shown as written, never followed
      } else if (m[5] !== undefined) {
        const href = inLink ? null : safeUrl(m[5]);
        if (href) link(m[5], href, parent, depth);
        else parent.appendChild(document.createTextNode(m[5]));
      } else {
        const [tag, inner] = m[6] !== undefined ? ["strong", m[6]] : m[7] !== undefined ? ["strong", m[7]]
          : m[8] !== undefined ? ["del", m[8]] : ["em", m[9] !== undefined ? m[9] : m[10]];
        const node = el(tag);
        inline(inner, node, depth + 1, inLink);
        parent.appendChild(node);
      }
    }
    if (pos < text.length) parent.appendChild(document.createTextNode(text.slice(pos)));
  }

  function inlineLines(lines, parent, depth) {
    lines.forEach((line, i) => {
      if (i > 0) parent.appendChild(el("br"));
      inline(line.trim(), parent, depth, false);
    });
  }

  function codeBlock(code, lang) {
    const box = el("div", "codeblock");
    const head = el("div", "codeblock-head");
    head.appendChild(el("span", "codeblock-lang", lang || "text"));
    const copy = el("button", "copy-code", "Copy");
    copy.type = "button";
    head.appendChild(copy);
    const pre = el("pre");
    const codeEl = el("code", null, code);
    if (lang) codeEl.dataset.lang = lang;
    pre.appendChild(codeEl);
    box.appendChild(head);
    box.appendChild(pre);
    return box;
  }

  function indentOf(line) {
    return line.length - line.trimStart().length;
  }

  function isTableStart(lines, i) {
    return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") && TABLE_RULE.test(lines[i + 1]);
  }

  function startsBlock(lines, i) {
    const line = lines[i];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || BULLET.test(line)
      || ORDERED.test(line) || isTableStart(lines, i);
  }

  function cells(row) {
    return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  function table(lines, i, parent, depth) {
    const wrap = el("div", "table-wrap");
    const t = el("table");
    const headRow = el("tr");
    cells(lines[i]).forEach((c) => { const th = el("th"); inline(c, th, depth, false); headRow.appendChild(th); });
    t.appendChild(el("thead")).appendChild(headRow);
    const body = t.appendChild(el("tbody"));
    i += 2;
    while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
      const tr = el("tr");
      cells(lines[i]).forEach((c) => { const td = el("td"); inline(c, td, depth, false); tr.appendChild(td); });
      body.appendChild(tr);
      i++;
    }
    wrap.appendChild(t);
    parent.appendChild(wrap);
    return i;
  }

  function list(lines, i, parent, depth) {
    const ordered = !BULLET.test(lines[i]);
    const re = ordered ? ORDERED : BULLET;
    const first = re.exec(lines[i]);
    const indent = first[1].length;
    const node = el(ordered ? "ol" : "ul");
    if (ordered && first[2] !== "1") node.start = parseInt(first[2], 10);
    const items = [];
    let item = null;
    while (i < lines.length) {
      const line = lines[i];
      const m = re.exec(line);
      if (m && m[1].length === indent) {
        const text = m[ordered ? 3 : 2];
        item = { lines: [text], offset: line.length - text.length };
        items.push(item);
      } else if (!line.trim()) {
        let j = i + 1;
        while (j < lines.length && !lines[j].trim()) j++;
        const next = j < lines.length ? re.exec(lines[j]) : null;
        if (j >= lines.length || !(indentOf(lines[j]) > indent || (next && next[1].length === indent))) break;
        item.lines.push("");
      } else if (indentOf(line) > indent || !startsBlock(lines, i)) {
        item.lines.push(line.slice(Math.min(indentOf(line), item.offset)));
      } else {
        break;
      }
      i++;
    }
    for (const it of items) {
      const li = el("li");
      if (it.lines.length === 1 || it.lines.every((l, k) => k === 0 || (l.trim() && !startsBlock(it.lines, k)))) {
        inlineLines(it.lines, li, depth);
      } else {
        blocks(it.lines, li, depth + 1);
      }
      node.appendChild(li);
    }
    parent.appendChild(node);
    return i;
  }

  /** Appends the block-level Markdown of `lines` to `parent`. */
  function blocks(lines, parent, depth) {
    if (depth > MAX_DEPTH) {
      parent.appendChild(el("p", null, lines.join("\n")));
      return;
    }
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        // An unclosed fence runs to the end: a code block still streaming shows as code.
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        if (i >= lines.length && body.length && !body[body.length - 1].trim()) body.pop(); // the text's final newline
        i++;
        parent.appendChild(codeBlock(body.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        const h = el("h" + Math.min(m[1].length + 2, 6));
        inline(m[2], h, depth, false);
        parent.appendChild(h);
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < lines.length && lines[i].trim() && (m = QUOTE.exec(lines[i]) || [null, lines[i]]); i++) inner.push(m[1]);
        blocks(inner, parent.appendChild(el("blockquote")), depth + 1);
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        i = list(lines, i, parent, depth);
      } else if (isTableStart(lines, i)) {
        i = table(lines, i, parent, depth);
      } else {
        const para = [line];
        for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines, i); i++) para.push(lines[i]);
        const p = el("p");
        inlineLines(para, p, depth);
        parent.appendChild(p);
      }
    }
  }

  /** A fragment holding `text` rendered as Markdown. */
  function render(text) {
    const fragment = document.createDocumentFragment();
    blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
    return fragment;
  }

  window.GantryMarkdown = { render };
})();
