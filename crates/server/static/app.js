// tiefsee chat page: conversations kept in localStorage, answers streamed from
// POST /v1/chat/completions (OpenAI's SSE chunks, with DeepSeek's `reasoning_content` deltas),
// markdown rendered by a small renderer that escapes all text before adding any markup.
"use strict";

const STORE = { conversations: "tiefsee.conversations", current: "tiefsee.current", settings: "tiefsee.settings" };
const $ = (id) => document.getElementById(id);

// ---------- storage ----------

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    setStatus(`Could not save to this browser's storage: ${e.message}`);
  }
}

// conversations: [{id, title, messages: [{role, content, reasoning?, note?}], updated}]
let conversations = load(STORE.conversations, []);
let currentId = load(STORE.current, null);
let settings = Object.assign({ temperature: 0.6, maxTokens: "", system: "", apiKey: "" }, load(STORE.settings, {}));
let running = null; // {controller, conversation, message, view} while an answer streams

function current() {
  return conversations.find((c) => c.id === currentId) ?? null;
}

function persist() {
  save(STORE.conversations, conversations);
  save(STORE.current, currentId);
}

function newConversation() {
  const conversation = { id: crypto.randomUUID?.() ?? String(Date.now() + Math.random()), title: "New chat", messages: [], updated: Date.now() };
  conversations.unshift(conversation);
  currentId = conversation.id;
  persist();
  return conversation;
}

// ---------- markdown ----------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Inline markup on already-escaped text. Code spans and links are set aside first, so that nothing
// inside them (an underscore in a URL, say) is taken for emphasis.
function inline(escaped) {
  const kept = [];
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
    /^(https?:|mailto:|\/|#)/i.test(url) ? keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`) : whole);
  s = s.replace(/\*\*([^*\n]+)\*\*|__([^_\n]+)__/g, (_, a, b) => `<strong>${a ?? b}</strong>`);
  s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)|(^|[^_\w])_([^_\n]+)_(?!\w)/g,
    (_, p1, a, p2, b) => `${p1 ?? p2}<em>${a ?? b}</em>`);
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[i]);
}

// Block markup: fenced code, headings, lists, quotes and paragraphs. The input is raw text.
function renderMarkdown(text) {
  const lines = escapeHtml(text.replace(/\u0000/g, "\uFFFD")).split("\n"); // NUL marks kept spans
  const out = [];
  let paragraph = [];
  let list = null; // {tag, items}
  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      flushParagraph();
      flushList();
      const code = [];
      // An unclosed fence (still streaming) runs to the end of the text.
      while (++i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i]);
      const lang = fence[1] ? ` class="language-${fence[1]}"` : "";
      out.push(`<pre><code${lang}>${code.join("\n")}</code></pre>`);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    const quote = line.match(/^&gt;\s?(.*)$/);
    if (heading) {
      flushParagraph();
      flushList();
      const level = Math.min(heading[1].length + 2, 6); // the page title owns h1 and h2
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list ??= { tag, items: [] };
      list.items.push((bullet ?? numbered)[1]);
    } else if (quote) {
      flushParagraph();
      flushList();
      out.push(`<blockquote>${inline(quote[1])}</blockquote>`);
    } else if (line.trim() === "") {
      flushParagraph();
      flushList();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph();
  flushList();
  return out.join("\n");
}

// ---------- rendering ----------

function setStatus(text) {
  $("status").textContent = text;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of conversations) {
    const item = document.createElement("li");
    item.setAttribute("aria-current", String(conversation.id === currentId));
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conversation.title;
    open.title = conversation.title;
    open.addEventListener("click", () => switchTo(conversation.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "✕";
    remove.setAttribute("aria-label", `Delete conversation “${conversation.title}”`);
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    item.append(open, remove);
    list.append(item);
  }
}

// One message's element; assistant messages get a reasoning block, a content block and a note line.
function messageView(message) {
  const element = document.createElement("article");
  element.className = `msg ${message.role}`;
  element.setAttribute("aria-label", message.role === "user" ? "You" : "Assistant");
  if (message.role === "user") {
    element.textContent = message.content;
    return { element, update() {} };
  }
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  const summary = document.createElement("summary");
  const thought = document.createElement("div");
  thought.className = "thought";
  reasoning.append(summary, thought);
  const content = document.createElement("div");
  content.className = "content";
  const note = document.createElement("p");
  note.className = "note";
  element.append(reasoning, content, note);
  return {
    element,
    update(streaming) {
      reasoning.hidden = !message.reasoning;
      summary.textContent = streaming && !message.content ? "Thinking…" : "Reasoning";
      thought.textContent = message.reasoning ?? "";
      content.innerHTML = renderMarkdown(message.content ?? "");
      note.textContent = message.note ?? "";
      note.classList.toggle("error", Boolean(message.error));
      note.hidden = !message.note;
    },
  };
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conversation = current();
  const messages = conversation?.messages ?? [];
  if (!messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything. Enter sends, Shift+Enter starts a new line.";
    box.append(empty);
  }
  for (const message of messages) {
    const view = messageView(message);
    view.update(false);
    box.append(view.element);
    if (running && running.message === message) running.view = view;
  }
  box.scrollTop = box.scrollHeight;
}

function setRunning(isRunning) {
  document.body.dataset.state = isRunning ? "streaming" : "idle";
  $("messages").setAttribute("aria-busy", String(isRunning));
  $("send").hidden = isRunning;
  $("stop").hidden = !isRunning;
  if (!isRunning) $("prompt").focus();
}

// ---------- actions ----------

function switchTo(id) {
  currentId = id;
  persist();
  renderConversations();
  renderMessages();
}

function deleteConversation(id) {
  if (running?.conversation.id === id) running.controller.abort();
  conversations = conversations.filter((c) => c.id !== id);
  if (currentId === id) currentId = conversations[0]?.id ?? null;
  persist();
  renderConversations();
  renderMessages();
}

function requestBody(conversation) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const m of conversation.messages) {
    // The reasoning of earlier turns is not sent back (DeepSeek's API rejects it as input).
    if (m.role === "assistant" && m.error) continue;
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages, stream: true, temperature: Number(settings.temperature) };
  const maxTokens = parseInt(settings.maxTokens, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// Yields the `data:` payload of each server-sent event in the response body.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error?.message ?? text;
  } catch {
    return text || `${response.status} ${response.statusText}`;
  }
}

async function send(text) {
  if (running || !text.trim()) return;
  const conversation = current() ?? newConversation();
  if (!conversation.messages.length) conversation.title = text.trim().split("\n")[0].slice(0, 60);
  conversation.messages.push({ role: "user", content: text });
  const body = requestBody(conversation);
  const message = { role: "assistant", content: "", reasoning: "" };
  conversation.messages.push(message);
  conversation.updated = Date.now();
  conversations = [conversation, ...conversations.filter((c) => c !== conversation)];
  persist();

  const controller = new AbortController();
  running = { controller, conversation, message, view: null };
  setRunning(true);
  setStatus("");
  renderConversations();
  renderMessages();
  running.view?.element.querySelector("details.reasoning")?.setAttribute("open", "");

  let frame = 0;
  const redraw = () => {
    frame = 0;
    if (!running?.view) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    running.view.update(true);
    if (atBottom) box.scrollTop = box.scrollHeight;
  };
  try {
    const headers = { "Content-Type": "application/json" };
    if (settings.apiKey) headers.Authorization = `Bearer ${settings.apiKey}`;
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    let finished = false;
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices?.[0];
      message.reasoning += choice?.delta?.reasoning_content ?? "";
      message.content += choice?.delta?.content ?? "";
      if (choice?.finish_reason === "length") message.note = "Stopped at the token limit.";
      frame ||= requestAnimationFrame(redraw);
    }
    if (!finished) throw new Error("the connection closed before the answer finished");
  } catch (e) {
    if (controller.signal.aborted) {
      message.note = "Stopped.";
    } else {
      message.note = `Error: ${e.message}`;
      message.error = true;
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    const view = running.view;
    running = null;
    conversation.updated = Date.now();
    persist();
    view?.update(false);
    // Reasoning folds away once the answer has started, so the answer is what is left in view.
    if (view && message.content) view.element.querySelector("details.reasoning")?.removeAttribute("open");
    setRunning(false);
  }
}

// ---------- wiring ----------

function bindSetting(id, key, event = "input") {
  const input = $(id);
  input.value = settings[key];
  input.addEventListener(event, () => {
    settings[key] = input.value;
    save(STORE.settings, settings);
    if (key === "temperature") $("temperature-value").textContent = Number(input.value).toFixed(2);
  });
}

bindSetting("temperature", "temperature");
bindSetting("max-tokens", "maxTokens");
bindSetting("system-prompt", "system");
bindSetting("api-key", "apiKey");
$("temperature-value").textContent = Number(settings.temperature).toFixed(2);

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt");
  const text = prompt.value;
  if (running || !text.trim()) return;
  prompt.value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => running?.controller.abort());

$("new-chat").addEventListener("click", () => {
  if (!current()?.messages.length && current()) return $("prompt").focus();
  newConversation();
  renderConversations();
  renderMessages();
  $("prompt").focus();
});

// Another tab changed the stored conversations: show them, unless this tab is mid-answer.
window.addEventListener("storage", (event) => {
  if (running || event.key !== STORE.conversations) return;
  conversations = load(STORE.conversations, []);
  if (!current()) currentId = conversations[0]?.id ?? null;
  renderConversations();
  renderMessages();
});

if (!current()) currentId = conversations[0]?.id ?? null;
renderConversations();
renderMessages();
setRunning(false);
