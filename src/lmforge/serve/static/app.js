// lmforge playground: a chat page over the server's own /v1/chat/completions stream. No build step, no CDN.
"use strict";

const TEXT = {
  en: {
    playground: "playground",
    system: "System prompt",
    systemPlaceholder: "e.g. You are a helpful assistant.",
    temperature: "Temperature",
    topP: "Top p",
    maxTokens: "Max tokens",
    apiKey: "API key",
    apiKeyPlaceholder: "only if the server has one",
    clear: "Clear chat",
    empty: "Say something to start the conversation.",
    promptPlaceholder: "Type a message — Enter to send, Shift+Enter for a new line",
    send: "Send",
    stop: "Stop",
    you: "You",
    assistant: "Assistant",
    error: "Error",
    stats: (tokens, seconds) => `${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s)`,
    info: (m) => `${m.id} · ${m.lmforge.architecture} · ${(m.lmforge.parameters / 1e6).toFixed(0)}M params · ` +
      `context ${m.max_model_len} · ${m.lmforge.dtype} on ${m.lmforge.device}`,
    offline: "server unreachable",
    alternatives: "Alternatives",
    clickToken: "Click a word of an answer to see the tokens the model weighed for it.",
    chosen: "chosen",
    attention: "Attention",
    attentionOpen: "Where a head looks",
    attentionHint: "One layer and head at a time, for a text of up to 128 tokens. Row: the token looking; " +
      "column: the token it looks at; darker = more weight.",
    attentionPlaceholder: "A text to look at, e.g. 床前明月光，疑是地上霜。",
    layer: "Layer",
    head: "Head",
    show: "Show",
    close: "Close",
  },
  zh: {
    playground: "演练场",
    system: "系统提示词",
    systemPlaceholder: "例如：你是一个乐于助人的助手。",
    temperature: "温度",
    topP: "Top p（核采样）",
    maxTokens: "最大生成长度",
    apiKey: "API 密钥",
    apiKeyPlaceholder: "仅当服务器设置了密钥时填写",
    clear: "清空对话",
    empty: "输入一句话，开始对话。",
    promptPlaceholder: "输入消息 —— Enter 发送，Shift+Enter 换行",
    send: "发送",
    stop: "停止",
    you: "你",
    assistant: "助手",
    error: "错误",
    stats: (tokens, seconds) => `${tokens} 个词元，用时 ${seconds.toFixed(1)} 秒（每秒 ${(tokens / seconds).toFixed(1)} 个）`,
    info: (m) => `${m.id} · ${m.lmforge.architecture} · ${(m.lmforge.parameters / 1e6).toFixed(0)}M 参数 · ` +
      `上下文 ${m.max_model_len} · ${m.lmforge.dtype}（${m.lmforge.device}）`,
    offline: "无法连接服务器",
    alternatives: "候选词",
    clickToken: "点击回答中的字词，查看模型在该处考虑过的候选词元及其概率。",
    chosen: "已选",
    attention: "注意力",
    attentionOpen: "查看注意力头",
    attentionHint: "每次显示一层的一个注意力头，文本最多 128 个词元。行：发出注意的词元；列：被注意的词元；颜色越深权重越大。",
    attentionPlaceholder: "要查看的文本，例如：床前明月光，疑是地上霜。",
    layer: "层",
    head: "头",
    show: "显示",
    close: "关闭",
  },
};

const $ = (id) => document.getElementById(id);
const turns = []; // {role, content} of the finished exchanges
let lang = localStorage.getItem("lmforge.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
let model = null;
let controller = null; // aborts the running request (the server then frees its slot)
let lastRun = null; // {tokens, seconds} of the last answer, shown in the current language

function t(key) {
  return TEXT[lang][key];
}

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-lang]")) el.classList.toggle("active", el.dataset.lang === lang);
  for (const el of document.querySelectorAll(".message")) el.querySelector(".role").textContent = t(el.dataset.role);
  showModel();
  showStats();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    model = response.ok ? body.data[0] : null;
    $("model-info").textContent = model ? "" : body.error.message;
  } catch {
    $("model-info").textContent = t("offline");
  }
  showModel();
}

function showModel() {
  if (model) $("model-info").textContent = t("info")(model);
}

function showStats() {
  $("stats").textContent = lastRun ? t("stats")(lastRun.tokens, lastRun.seconds) : "";
}

function addMessage(role, text) {
  $("empty").hidden = true;
  const el = document.createElement("div");
  el.className = `message ${role}`;
  el.dataset.role = role === "user" ? "you" : role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = t(el.dataset.role);
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  el.append(label, content);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return content;
}

// Server-sent events arrive in network chunks that may cut a line (or a UTF-8 character) anywhere:
// TextDecoder's stream mode keeps partial characters, and only complete lines are parsed.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns, { role: "user", content: text });
  addMessage("user", text);
  const output = addMessage("assistant", "");
  output.classList.add("streaming");
  setBusy(true);
  controller = new AbortController();
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: model ? model.id : "default",
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        top_p: Number($("top-p").value),
        max_tokens: Number($("max-tokens").value),
        logprobs: true, // every token's probability and its top alternatives: clicking a word shows them
        top_logprobs: 5,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(body.error.message);
    }
    let pending = []; // logprobs of tokens whose text is still held back (part of a character)
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices.length ? chunk.choices[0] : { delta: {} };
      if (choice.logprobs && choice.logprobs.content) pending.push(...choice.logprobs.content);
      if (choice.delta.content) {
        output.append(tokenSpan(choice.delta.content, pending));
        pending = [];
        output.scrollIntoView({ block: "end" });
      }
    }
    turns.push({ role: "user", content: text }, { role: "assistant", content: output.textContent });
    lastRun = { tokens, seconds: (performance.now() - started) / 1000 };
    showStats();
  } catch (err) {
    if (err.name !== "AbortError") {
      output.parentElement.classList.add("error");
      output.textContent += (output.textContent ? "\n" : "") + `${t("error")}: ${err.message}`;
    }
  } finally {
    output.classList.remove("streaming");
    setBusy(false);
  }
}

// A piece of the answer (whole characters: the server never splits one) with the tokens that made it.
function tokenSpan(text, logprobs) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  span.tokens = logprobs;
  if (logprobs.length) {
    const p = Math.exp(logprobs.reduce((sum, e) => sum + e.logprob, 0));
    span.title = `${(100 * p).toFixed(1)}%`;
    span.addEventListener("click", () => showAlternatives(span));
  }
  return span;
}

function percent(logprob) {
  return `${(100 * Math.exp(logprob)).toFixed(1)}%`;
}

function showAlternatives(span) {
  for (const el of document.querySelectorAll(".token.selected")) el.classList.remove("selected");
  span.classList.add("selected");
  const panel = $("alternatives");
  panel.replaceChildren();
  for (const entry of span.tokens) {
    const head = document.createElement("div");
    head.className = "alt-chosen";
    head.textContent = `${JSON.stringify(entry.token)} ${percent(entry.logprob)}`;
    const list = document.createElement("ol");
    for (const alt of entry.top_logprobs) {
      const item = document.createElement("li");
      item.textContent = `${JSON.stringify(alt.token)} ${percent(alt.logprob)}`;
      if (alt.token === entry.token) {
        item.classList.add("chosen");
        item.title = t("chosen");
      }
      list.append(item);
    }
    panel.append(head, list);
  }
}

// The attention view: one layer's and head's weights over a text, drawn as a token x token grid.
// Changing the layer and then the head sends two requests; only the last one asked for is drawn, whichever
// answers first (a late answer for the old choice would reset the selects and draw the wrong head).
let attentionAsked = 0;

async function showAttention() {
  const text = $("attention-text").value.trim();
  if (!text) return;
  const asked = ++attentionAsked;
  $("attention-error").textContent = "";
  try {
    const response = await fetch("/v1/explain/attention", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: model ? model.id : "default",
        input: text,
        layer: Number($("attention-layer").value),
        head: Number($("attention-head").value),
      }),
    });
    const body = await response.json();
    if (asked !== attentionAsked) return;
    if (!response.ok) throw new Error(body.error.message);
    fillSelect($("attention-layer"), body.layers, body.layer);
    fillSelect($("attention-head"), body.heads, body.head);
    drawHeatmap(body);
  } catch (err) {
    if (asked !== attentionAsked) return;
    $("attention-map").replaceChildren();
    $("attention-error").textContent = `${t("error")}: ${err.message}`;
  }
}

function fillSelect(select, count, value) {
  if (select.options.length !== count) {
    select.replaceChildren(...Array.from({ length: count }, (_, i) => new Option(String(i), String(i))));
  }
  select.value = String(value);
}

function drawHeatmap(view) {
  const top = Math.max(...view.weights.flat(), 1e-9); // the darkest cell is the head's largest weight
  const grid = document.createElement("div");
  grid.className = "heatmap-grid";
  grid.style.gridTemplateColumns = `max-content repeat(${view.tokens.length}, 1.5rem)`;
  grid.append(document.createElement("div"));
  for (const token of view.tokens) {
    const label = document.createElement("div");
    label.className = "col-label";
    label.textContent = token;
    grid.append(label);
  }
  view.weights.forEach((row, i) => {
    const label = document.createElement("div");
    label.className = "row-label";
    label.textContent = view.tokens[i];
    grid.append(label);
    row.forEach((weight, j) => {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.style.background = `rgba(37, 99, 235, ${(weight / top).toFixed(3)})`;
      cell.title = `${view.tokens[i]} → ${view.tokens[j]}: ${(100 * weight).toFixed(1)}%`;
      grid.append(cell);
    });
  });
  const caption = document.createElement("p");
  caption.className = "hint";
  caption.textContent = `${t("layer")} ${view.layer} · ${t("head")} ${view.head}`;
  $("attention-map").replaceChildren(caption, grid);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
  if (!busy) $("prompt").focus();
}

function bindRange(id) {
  const show = () => ($(`${id}-value`).textContent = $(id).value);
  $(id).addEventListener("input", show);
  show();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("prompt").disabled) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("attention-open").addEventListener("click", () => $("attention-dialog").showModal());
$("attention-show").addEventListener("click", showAttention);
$("attention-layer").addEventListener("change", showAttention);
$("attention-head").addEventListener("change", showAttention);
$("clear").addEventListener("click", () => {
  turns.length = 0;
  for (const el of document.querySelectorAll(".message")) el.remove();
  $("empty").hidden = false;
  $("alternatives").replaceChildren();
  lastRun = null;
  showStats();
});
for (const button of document.querySelectorAll("[data-lang]")) {
  button.addEventListener("click", () => {
    lang = button.dataset.lang;
    localStorage.setItem("lmforge.lang", lang);
    applyLanguage();
  });
}
$("api-key").value = localStorage.getItem("lmforge.apiKey") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lmforge.apiKey", $("api-key").value.trim());
  loadModel();
});
bindRange("temperature");
bindRange("top-p");
applyLanguage();
loadModel();
