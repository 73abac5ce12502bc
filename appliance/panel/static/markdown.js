// A small Markdown renderer for chat answers: fenced and inline code, headings, bold, italics,
// links, lists, block quotes, paragraphs. Everything is HTML-escaped first, so a model's output
// can never inject markup; links keep only http(s), mailto and relative targets.
"use strict";

(function () {
  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  function safeUrl(url) {
    return /^(https?:|mailto:|\/|#|\.)/i.test(url) ? url : "#";
  }

  // Inline spans on already-escaped text; code spans are cut out first so nothing inside them changes.
  function inline(text) {
    const codes = [];
    text = text.replace(/`([^`]+)`/g, (_, code) => { codes.push(code); return `\u0000${codes.length - 1}\u0000`; });
    text = text
      .replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (_, label, url) => `<a href="${safeUrl(url)}" rel="noopener noreferrer">${label}</a>`)
      .replace(/\*\*([^*]+)\*\*|__([^_]+)__/g, (_, a, b) => `<strong>${a || b}</strong>`)
      .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
      .replace(/(^|\W)_([^_\s][^_]*)_(?=\W|$)/g, "$1<em>$2</em>");
    return text.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[+i]}</code>`);
  }

  const BLOCK_START = /^(#{1,6}\s|```|&gt;|\s*[-*+]\s|\s*\d+[.)]\s)/;

  function renderMarkdown(source) {
    const lines = escapeHtml(source.replace(/\r\n?/g, "\n")).split("\n");
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (/^```/.test(line)) {                       // fenced code, also while still streaming
        const lang = line.slice(3).trim().replace(/[^\w-]/g, "");
        const body = [];
        for (i++; i < lines.length && !/^```/.test(lines[i]); i++) body.push(lines[i]);
        i++;
        out.push(`<pre><code${lang ? ` class="language-${lang}"` : ""}>${body.join("\n")}</code></pre>`);
      } else if (/^#{1,6}\s/.test(line)) {
        const level = line.match(/^#+/)[0].length;
        out.push(`<h${level}>${inline(line.slice(level).trim())}</h${level}>`);
        i++;
      } else if (/^&gt;\s?/.test(line)) {
        const body = [];
        for (; i < lines.length && /^&gt;\s?/.test(lines[i]); i++) body.push(lines[i].replace(/^&gt;\s?/, ""));
        out.push(`<blockquote>${inline(body.join("<br>"))}</blockquote>`);
      } else if (/^\s*([-*+]|\d+[.)])\s/.test(line)) {
        const ordered = /^\s*\d/.test(line);
        const item = ordered ? /^\s*\d+[.)]\s/ : /^\s*[-*+]\s/;
        const items = [];
        for (; i < lines.length && item.test(lines[i]); i++) {
          items.push(`<li>${inline(lines[i].replace(/^\s*([-*+]|\d+[.)])\s/, ""))}</li>`);
        }
        out.push(ordered ? `<ol>${items.join("")}</ol>` : `<ul>${items.join("")}</ul>`);
      } else if (!line.trim()) {
        i++;
      } else {
        const body = [];
        for (; i < lines.length && lines[i].trim() && !BLOCK_START.test(lines[i]); i++) body.push(lines[i]);
        if (!body.length) body.push(lines[i++]);   // a line that only looked like a block start
        out.push(`<p>${inline(body.join("<br>"))}</p>`);
      }
    }
    return out.join("\n");
  }

  window.renderMarkdown = renderMarkdown;
})();
