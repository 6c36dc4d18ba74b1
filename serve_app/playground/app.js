// Lance playground: a plain client of this server's OpenAI-compatible API (no build step, no
// dependencies). It asks /v1/models what the server serves (lance.tasks, limits, defaults), offers
// one tab per task, and sends exactly what any client would send: /v1/chat/completions with
// `stream: true` (text deltas, `lance_progress` chunks, then the image) and /v1/images/generations.
"use strict";

const API_KEY_STORE = "lance-playground.api-key";   // sessionStorage: gone when the tab closes
const HISTORY_STORE = "lance-playground.history";   // sessionStorage
const HISTORY_MAX = 30;
const THUMB_SIDE = 96;

// Every task the server may list in /v1/models `lance.tasks`, in tab order. `output` is the
// modality the request asks for; `input` the kind of file the task takes.
const TASKS = {
  t2i: {label: "Text → image", output: "image", action: "Generate",
        fields: ["prompt", "negative_prompt", "size", "num_inference_steps", "seed", "cfg_text_scale"],
        advanced: ["n", "timestep_shift", "system_prompt"]},
  image_edit: {label: "Edit image", output: "image", input: "image", action: "Edit",
               fields: ["image", "prompt", "resolution", "num_inference_steps", "seed", "cfg_text_scale"],
               advanced: ["timestep_shift", "system_prompt"]},
  x2t_image: {label: "Understand image", output: "text", input: "image", action: "Ask",
              fields: ["image", "prompt", "resolution", "max_tokens", "temperature"],
              advanced: ["seed", "system_prompt"]},
  chat: {label: "Chat", output: "text", action: "Send", chat: true,
         fields: ["prompt", "max_tokens", "temperature"], advanced: ["seed", "system_prompt"]},
  t2v: {label: "Text → video", output: "video", action: "Generate",
        fields: ["prompt", "negative_prompt", "size", "num_frames", "num_inference_steps", "seed",
                 "cfg_text_scale"], advanced: ["timestep_shift", "system_prompt"]},
  i2v: {label: "Image → video", output: "video", input: "image", action: "Animate",
        fields: ["image", "prompt", "num_frames", "num_inference_steps", "seed", "cfg_text_scale"],
        advanced: ["timestep_shift", "system_prompt"]},
  video_edit: {label: "Edit video", output: "video", input: "video", action: "Edit",
               fields: ["video", "prompt", "num_inference_steps", "seed", "cfg_text_scale"],
               advanced: ["timestep_shift", "system_prompt"]},
  x2t_video: {label: "Understand video", output: "text", input: "video", action: "Ask",
              fields: ["video", "prompt", "max_tokens", "temperature"], advanced: ["seed", "system_prompt"]},
};

// Prompt labels and starting text per task.
const PROMPTS = {
  t2i: ["Prompt", "A red cube on a blue table"],
  image_edit: ["Instruction", "Make the cube green"],
  x2t_image: ["Question", "What is in this image?"],
  chat: ["Message", "Hello! Who are you?"],
  t2v: ["Prompt", "A paper boat drifting down a rainy street"],
  i2v: ["Prompt", "The scene comes alive, the camera slowly pushes in"],
  video_edit: ["Instruction", "Make it snow"],
  x2t_video: ["Question", "What happens in this video?"],
};

const state = {model: null, info: null, retry: null};

// -- small DOM helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function $(selector, root = document) { return root.querySelector(selector); }

function seconds(ms) { return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`; }

function randomSeed() {
  const buf = new Uint32Array(1);
  crypto.getRandomValues(buf);
  return buf[0] % 2147483647;
}

// -- the API ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, error) {
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.param = error ? error.param : null;
    this.code = error ? error.code : null;
  }
}

function apiHeaders(json = true) {
  const headers = {};
  if (json) headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(API_KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: the status says it */ }
  return new ApiError(response.status, body && body.error ? body.error : {message: `HTTP ${response.status}`});
}

// Relative URLs: the page works under any route prefix the app is served at.
async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) throw await errorOf(response);
  return response;
}

// `data:` payloads of a server-sent event stream, parsed; ends at `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// -- API key ---------------------------------------------------------------------------------------

function showApiKeyPanel(reason) {
  const panel = $("#api-key-panel");
  panel.hidden = false;
  $("#api-key-button").setAttribute("aria-expanded", "true");
  $("#api-key-reason").textContent = reason || "";
  $("#api-key-input").focus();
}

function setupApiKey() {
  $("#api-key-button").addEventListener("click", () => {
    const panel = $("#api-key-panel");
    if (panel.hidden) showApiKeyPanel("Set the key this server expects (if it asks for one).");
    else { panel.hidden = true; $("#api-key-button").setAttribute("aria-expanded", "false"); }
  });
  $("#api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#api-key-input").value.trim();
    if (key) sessionStorage.setItem(API_KEY_STORE, key);
    else sessionStorage.removeItem(API_KEY_STORE);
    $("#api-key-input").value = "";
    $("#api-key-panel").hidden = true;
    $("#api-key-button").setAttribute("aria-expanded", "false");
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  });
  $("#api-key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(API_KEY_STORE);
    $("#api-key-input").value = "";
    $("#api-key-reason").textContent = "The key is forgotten.";
  });
}

// A 401 asks for the key, then runs `retry` once the key is saved.
function handleUnauthorized(error, retry) {
  if (!(error instanceof ApiError) || error.status !== 401) return false;
  state.retry = retry;
  showApiKeyPanel(`The server asks for an API key: ${error.message}`);
  return true;
}

// -- the model -------------------------------------------------------------------------------------

async function loadModel() {
  const banner = $("#server-error");
  try {
    const response = await api("v1/models", {headers: apiHeaders(false)});
    const models = (await response.json()).data || [];
    if (!models.length) throw new ApiError(0, {message: "the server lists no model"});
    banner.hidden = true;
    return models[0];
  } catch (error) {
    if (handleUnauthorized(error, init)) {
      $("#model-line").textContent = "Waiting for an API key…";
      return null;
    }
    banner.textContent = `Cannot reach the server's /v1/models: ${error.message}`;
    banner.hidden = false;
    $("#model-line").textContent = "Not connected.";
    return null;
  }
}

function describeModel(model) {
  const lance = model.lance || {};
  const parts = [`Model ${model.id}`];
  if (lance.stage_graph) parts.push(`stage graph ${lance.stage_graph}`);
  $("#model-line").textContent = parts.join(" · ");
  const tiny = $("#tiny-banner");
  if (lance.tiny_random_weights) {
    tiny.textContent = "This server runs the tiny random-weights test checkpoint: images are noise and " +
      "answers are gibberish. The API, knobs, progress and errors are real; serve a real checkpoint " +
      "(LANCE_MODEL=… make serve) for real results.";
    tiny.hidden = false;
  } else {
    tiny.hidden = true;
  }
}

// -- knobs -----------------------------------------------------------------------------------------

// Each knob: how it is shown and which request field (`params`) it fills; the server's error
// `param` is matched against `params` to put its message next to the knob.
function knobSpecs(model) {
  const lance = model.lance || {};
  const limits = lance.limits || {};
  const defaults = lance.defaults || {};
  const maxSide = lance.max_image_side || 1024;
  const minSide = limits.min_image_side || 64;
  const multiple = limits.size_multiple || 16;
  const [defW, defH] = String(defaults.size || "768x768").split("x").map(Number);
  const maxSteps = limits.max_inference_steps || 200;
  const maxTokens = lance.max_model_len || 4096;
  return {
    negative_prompt: {kind: "textarea", label: "Negative prompt", optional: true, rows: 2,
                      hint: "Replaces the caption in the unconditional branch of CFG.",
                      params: ["negative_prompt"]},
    size: {kind: "size", label: "Size (width × height)", width: defW, height: defH,
           min: minSide, max: maxSide, step: multiple, params: ["size", "width", "height"],
           hint: `Pixels, multiples of ${multiple} from ${minSide} to ${maxSide}. Default ${defW}×${defH}.`},
    num_inference_steps: {kind: "number", label: "Steps", value: defaults.num_inference_steps ?? 30,
                          min: 1, max: maxSteps, step: 1, params: ["num_inference_steps"],
                          hint: `1 to ${maxSteps}. Default ${defaults.num_inference_steps ?? 30}.`},
    seed: {kind: "seed", label: "Seed", value: defaults.seed ?? 42, min: 0, step: 1, params: ["seed"],
           hint: `The same seed and knobs give the same result. Default ${defaults.seed ?? 42}.`},
    cfg_text_scale: {kind: "number", label: "CFG scale", value: defaults.cfg_text_scale ?? 4.0,
                     min: 0, max: 100, step: 0.1, params: ["cfg_text_scale"],
                     hint: `Text guidance, 0 to 100; 1 turns it off. Default ${defaults.cfg_text_scale ?? 4}.`},
    timestep_shift: {kind: "number", label: "Timestep shift", value: defaults.timestep_shift ?? 3.5,
                     min: 0.1, max: 100, step: 0.1, params: ["timestep_shift"],
                     hint: `Above 0, at most 100. Default ${defaults.timestep_shift ?? 3.5}.`},
    n: {kind: "number", label: "Images", value: 1, min: 1, max: limits.max_images_per_request || 4,
        step: 1, params: ["n"], nodefault: true,
        hint: "More than one uses /v1/images/generations (seeds seed, seed+1, …; no step progress)."},
    resolution: {kind: "select", label: "Input resolution", value: defaults.resolution || "image_768res",
                 options: [["image_768res", "768 (default)"], ["image_512res", "512"], ["image_256res", "256"]],
                 params: ["resolution"], hint: "The bucket the input image is resized to."},
    max_tokens: {kind: "number", label: "Max tokens", value: defaults.max_tokens ?? 256, min: 1,
                 max: maxTokens, step: 1, params: ["max_tokens", "max_completion_tokens"],
                 hint: `1 to ${maxTokens}. Default ${defaults.max_tokens ?? 256}.`},
    temperature: {kind: "number", label: "Temperature", value: defaults.temperature ?? 0, min: 0, max: 2,
                  step: 0.05, params: ["temperature", "text_temperature", "do_sample"],
                  hint: "0 is greedy (as upstream); up to 2."},
    num_frames: {kind: "number", label: "Frames", value: 33, min: 1, step: 4, params: ["num_frames"],
                 hint: "4k+1 frames (e.g. 33, 81, 121)."},
    system_prompt: {kind: "textarea", label: "System prompt", optional: true, rows: 2,
                    hint: "Empty: Lance's own system prompt for this task.", params: ["system_prompt"]},
    image: {kind: "file", label: "Image", accept: "image/*", params: ["image"]},
    video: {kind: "file", label: "Video", accept: "video/*", params: ["video"]},
  };
}

function fieldBox(task, name, spec, control, labelFor) {
  const id = `${task}-${name}`;
  const hintId = spec.hint ? `${id}-hint` : null;
  const errorId = `${id}-error`;
  const label = spec.kind === "size" ? el("legend", {text: spec.label})
    : el("label", {for: labelFor || id}, spec.label, spec.optional ? el("span", {class: "opt", text: " (optional)"}) : null);
  const box = el(spec.kind === "size" ? "fieldset" : "div",
                 {class: `field field-${spec.kind}`, "data-field": name, "data-params": spec.params.join(" ")},
                 label, control,
                 hintId ? el("p", {class: "hint", id: hintId, text: spec.hint}) : null,
                 el("p", {class: "field-error", id: errorId, hidden: true}));
  for (const input of box.querySelectorAll("input, textarea, select")) {
    input.setAttribute("aria-describedby", [hintId, errorId].filter(Boolean).join(" "));
  }
  return box;
}

function numberInput(id, name, spec, value) {
  return el("input", {id, name, type: "number", inputmode: spec.step < 1 ? "decimal" : "numeric",
                      min: spec.min, max: spec.max, step: spec.step, value});
}

function buildField(task, name, specs) {
  const spec = name === "prompt"
    ? {kind: "textarea", label: PROMPTS[task][0], rows: 3, value: PROMPTS[task][1], params: ["prompt", "messages"]}
    : specs[name];
  const id = `${task}-${name}`;
  switch (spec.kind) {
    case "textarea": {
      const area = el("textarea", {id, name, rows: spec.rows || 3});
      area.value = spec.value || "";
      return fieldBox(task, name, spec, area);
    }
    case "number":
      return fieldBox(task, name, spec, numberInput(id, name, spec, spec.value));
    case "seed": {
      const input = numberInput(id, name, spec, spec.value);
      const random = el("button", {type: "button", class: "secondary", "aria-label": `Random seed for ${TASKS[task].label}`,
                                   onclick: () => { input.value = randomSeed(); input.dispatchEvent(new Event("input")); }},
                        "Random");
      return fieldBox(task, name, spec, el("div", {class: "row"}, input, random));
    }
    case "select": {
      const select = el("select", {id, name}, spec.options.map(([value, text]) =>
        el("option", {value, selected: value === spec.value}, text)));
      return fieldBox(task, name, spec, select);
    }
    case "size": {
      const w = numberInput(`${id}-width`, "width", spec, spec.width);
      const h = numberInput(`${id}-height`, "height", spec, spec.height);
      const row = el("div", {class: "row size-row"},
                     el("label", {for: `${id}-width`, class: "inline"}, "Width"), w,
                     el("span", {"aria-hidden": "true", text: "×"}),
                     el("label", {for: `${id}-height`, class: "inline"}, "Height"), h);
      return fieldBox(task, name, spec, row);
    }
    case "file":
      return fileField(task, name, spec);
    default:
      throw new Error(`unknown knob kind ${spec.kind}`);
  }
}

// A file input that also takes drag-and-drop (on the whole box), with a preview.
function fileField(task, name, spec) {
  const id = `${task}-${name}`;
  const input = el("input", {id, name, type: "file", accept: spec.accept});
  const preview = el("div", {class: "preview", "aria-live": "polite"});
  const drop = el("div", {class: "drop"},
                  el("p", {class: "drop-text", text: `Drop ${name === "video" ? "a video" : "an image"} here, or choose a file:`}),
                  input, preview);
  const box = fieldBox(task, name, {...spec, hint: spec.hint || `Upload or drag and drop ${name === "video" ? "a video file" : "a PNG, JPEG or WebP image"}.`}, drop);
  const show = () => {
    preview.replaceChildren();
    const file = input.files && input.files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    const media = name === "video"
      ? el("video", {src: url, controls: true, muted: true, class: "thumb"})
      : el("img", {src: url, alt: `Chosen image ${file.name}`, class: "thumb"});
    const caption = el("p", {class: "hint", text: `${file.name} (${Math.ceil(file.size / 1024)} KiB)`});
    if (media.tagName === "IMG") {
      media.addEventListener("load", () => { caption.textContent += ` · ${media.naturalWidth}×${media.naturalHeight}`; });
    }
    preview.append(media, caption);
  };
  input.addEventListener("change", show);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      show();
    }
  });
  return box;
}

// -- panels ----------------------------------------------------------------------------------------

function buildPanel(task, specs) {
  const def = TASKS[task];
  const form = el("form", {class: "task-form", novalidate: true, "aria-label": def.label});
  for (const name of def.fields) form.append(buildField(task, name, specs));
  if (def.advanced.length) {
    form.append(el("details", {class: "advanced"}, el("summary", {text: "More knobs"}),
                   el("div", {class: "advanced-body"}, def.advanced.map((name) => buildField(task, name, specs)))));
  }
  const run = el("button", {type: "submit", class: "run"}, def.action);
  const stop = el("button", {type: "button", class: "stop", disabled: true}, "Stop");
  const actions = el("div", {class: "actions"}, run, stop);
  if (def.chat) {
    actions.append(el("button", {type: "button", class: "secondary new-chat"}, "New conversation"));
  }
  form.append(el("p", {class: "form-error", role: "alert", hidden: true}), actions);

  const output = el("div", {class: "output", "aria-label": "Result"},
                    el("div", {class: "progress", hidden: true},
                       el("label", {for: `${task}-progress`, class: "progress-label", text: "Progress"}),
                       el("progress", {id: `${task}-progress`, max: 100}),
                       el("span", {class: "progress-text", "aria-hidden": "true"})),
                    el("p", {class: "status", role: "status"}),
                    def.chat ? el("div", {class: "conversation", role: "log", "aria-label": "Conversation"}) : null,
                    el("div", {class: "result"}));
  const panel = el("section", {id: `panel-${task}`, class: "panel", role: "tabpanel", "aria-labelledby": `tab-${task}`,
                               "data-task": task, tabindex: "0", hidden: true},
                   el("h2", {class: "panel-title", text: def.label}), el("div", {class: "panel-body"}, form, output));
  const ctl = {task, panel, form, run, stop, output, controller: null, conversation: []};
  form.addEventListener("submit", (event) => { event.preventDefault(); runTask(ctl); });
  stop.addEventListener("click", () => { if (ctl.controller) ctl.controller.abort(); });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.tagName === "TEXTAREA") {
      event.preventDefault();
      form.requestSubmit();
    }
    if (event.key === "Escape" && ctl.controller) ctl.controller.abort();
  });
  if (def.chat) {
    $(".new-chat", form).addEventListener("click", () => {
      if (ctl.controller) ctl.controller.abort();
      ctl.conversation = [];
      $(".conversation", output).replaceChildren();
      $(".result", output).replaceChildren();
      $(".status", output).textContent = "";
    });
  }
  return ctl;
}

function buildTabs(tasks, controls) {
  const list = $("#tablist");
  const panels = $("#panels");
  list.replaceChildren();
  panels.replaceChildren();
  const tabs = tasks.map((task) => el("button", {
    type: "button", role: "tab", id: `tab-${task}`, "aria-controls": `panel-${task}`,
    "aria-selected": "false", tabindex: "-1", "data-task": task}, TASKS[task].label));
  const select = (task, focus) => {
    for (const tab of tabs) {
      const on = tab.dataset.task === task;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
    }
    for (const ctl of controls.values()) ctl.panel.hidden = ctl.task !== task;
    if (location.hash !== `#${task}`) history.replaceState(null, "", `#${task}`);
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab.dataset.task, false));
    tab.addEventListener("keydown", (event) => {
      const next = {ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1}[event.key];
      if (next === undefined) return;
      event.preventDefault();
      select(tabs[(next + tabs.length) % tabs.length].dataset.task, true);
    });
  });
  list.append(...tabs);
  for (const task of tasks) panels.append(controls.get(task).panel);
  const wanted = location.hash.slice(1);
  select(tasks.includes(wanted) ? wanted : tasks[0], false);
  return select;
}

// -- reading a form into a request -----------------------------------------------------------------

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

function readNumber(form, name) {
  const input = form.elements.namedItem(name);
  if (!input) return undefined;
  if (input.validity.badInput) throw new FieldError(name, "Enter a number.");
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function readText(form, name) {
  const input = form.elements.namedItem(name);
  return input ? input.value : undefined;
}

function readFileAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The request a task sends, and which field each error `param` belongs to.
async function buildRequest(ctl) {
  const def = TASKS[ctl.task];
  const form = ctl.form;
  const prompt = readText(form, "prompt").trim();
  const knobs = {};
  for (const name of ["num_inference_steps", "seed", "cfg_text_scale", "timestep_shift", "num_frames",
                      "max_tokens", "temperature"]) {
    const value = readNumber(form, name);
    if (value !== undefined) knobs[name] = value;
  }
  for (const name of ["negative_prompt", "system_prompt", "resolution"]) {
    const value = readText(form, name);
    if (value !== undefined && value.trim() !== "") knobs[name] = value.trim();
  }
  const width = readNumber(form, "width");
  const height = readNumber(form, "height");
  if (width !== undefined || height !== undefined) knobs.size = `${width ?? ""}x${height ?? ""}`;
  const n = readNumber(form, "n");

  const fileName = def.input;   // "image" / "video" / undefined
  let media = null;
  if (fileName) {
    const file = form.elements.namedItem(fileName).files[0];
    if (!file) throw new FieldError(fileName, `Choose ${fileName === "video" ? "a video" : "an image"} first.`);
    media = {url: await readFileAsDataUrl(file), name: file.name};
  }
  if (!prompt && !(def.output === "text" && media)) throw new FieldError("prompt", "Write a prompt first.");

  const params = {messages: "prompt", image: "image", video: "video"};
  if (def.output === "image" && n !== undefined && n > 1) {   // several images: the OpenAI images API
    const body = {model: state.model.id, prompt, n, response_format: "b64_json", ...knobs};
    return {kind: "images", path: "v1/images/generations", body, params, summary: {prompt, ...knobs, n}};
  }
  const content = [];
  const messages = [];
  if (def.chat) {
    for (const turn of ctl.conversation) {
      params[`messages[${messages.length}]`] = "conversation";   // not a field: the earlier turns
      messages.push(turn);
    }
  }
  if (media) {
    const part = fileName === "video" ? {type: "video_url", video_url: {url: media.url}}
      : {type: "image_url", image_url: {url: media.url}};
    params[`messages[${messages.length}].content[${content.length}]`] = fileName;
    content.push(part);
  }
  if (prompt) {
    params[`messages[${messages.length}].content[${content.length}]`] = "prompt";
    content.push({type: "text", text: prompt});
  }
  messages.push({role: "user", content: def.chat ? prompt : content});
  const body = {model: state.model.id, messages, modalities: [def.output], stream: true,
                stream_options: {include_usage: true}, ...knobs};
  return {kind: "chat", path: "v1/chat/completions", body, params, prompt,
          summary: {prompt, ...knobs, ...(media ? {input: media.name} : {})}};
}

// -- errors next to their fields -------------------------------------------------------------------

function clearErrors(ctl) {
  for (const p of ctl.form.querySelectorAll(".field-error, .form-error")) { p.hidden = true; p.textContent = ""; }
  for (const input of ctl.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// The field an error `param` names: the request's own map (message parts), else the knob whose
// request names include the param ("height" -> size), else none (shown under the form).
function paramTarget(ctl, param, paramMap) {
  if (!param) return {box: null, name: null};
  const keys = Object.keys(paramMap).sort((a, b) => b.length - a.length);
  const key = keys.find((k) => param === k || param.startsWith(`${k}.`) || param.startsWith(`${k}[`));
  const name = key ? paramMap[key] : null;
  const base = param.split(/[.[]/)[0];
  for (const box of ctl.form.querySelectorAll("[data-params]")) {
    const names = box.dataset.params.split(" ");
    if ((name && box.dataset.field === name) || (!name && (names.includes(param) || names.includes(base)))) {
      return {box, name};
    }
  }
  return {box: null, name};
}

function showError(ctl, error, paramMap = {}) {
  const target = error instanceof FieldError ? {box: $(`[data-field="${error.field}"]`, ctl.form), name: error.field}
    : paramTarget(ctl, error.param, paramMap);
  const box = target.box;
  let message = error.message || String(error);
  if (target.name === "conversation") {
    message = `An earlier turn of this conversation was refused: ${message} (start a new conversation to drop it).`;
  }
  if (box) {
    const p = $(".field-error", box);
    p.textContent = message;
    p.hidden = false;
    const details = box.closest("details");
    if (details) details.open = true;
    // the control the param names (size: "width" or "height"), else every control of the field
    const controls = [...box.querySelectorAll("input, textarea, select")];
    const named = controls.filter((c) => c.name === error.param);
    const marked = named.length ? named : controls;
    for (const c of marked) c.setAttribute("aria-invalid", "true");
    if (marked.length) marked[0].focus({preventScroll: true});
    box.scrollIntoView({block: "nearest"});
  } else {
    const p = $(".form-error", ctl.form);
    p.textContent = message;
    p.hidden = false;
  }
  $(".status", ctl.output).textContent = box ? "The server refused the request (see the marked field)." : "Failed.";
}

// -- running a task --------------------------------------------------------------------------------

function setProgress(ctl, step, total) {
  const wrap = $(".progress", ctl.output);
  const bar = $("progress", wrap);
  wrap.hidden = false;
  if (step === null) {            // indeterminate: waiting for the first step
    bar.removeAttribute("value");
    $(".progress-text", wrap).textContent = "";
    bar.removeAttribute("aria-valuetext");
    return;
  }
  bar.max = total;
  bar.value = step;
  const pct = Math.round((100 * step) / total);
  const text = `Step ${step} of ${total} (${pct} %)`;
  $(".progress-text", wrap).textContent = text;
  bar.setAttribute("aria-valuetext", text);
}

function setRunning(ctl, running) {
  ctl.run.disabled = running;
  ctl.stop.disabled = !running;
  ctl.panel.setAttribute("aria-busy", String(running));
}

function mediaPart(part) {
  if (!part || typeof part !== "object") return null;
  const url = (part.image_url && part.image_url.url) || (part.video_url && part.video_url.url);
  if (!url) return null;
  const video = part.type === "video_url" || url.startsWith("data:video/");
  return {url, video};
}

function showMedia(ctl, items, meta) {
  const result = $(".result", ctl.output);
  result.replaceChildren();
  items.forEach((item, i) => {
    const ext = item.video ? "mp4" : "png";
    const name = `lance-${ctl.task}-${meta.seed ?? "default"}${items.length > 1 ? `-${i}` : ""}.${ext}`;
    const media = item.video
      ? el("video", {src: item.url, controls: true, class: "result-media", "aria-label": `Generated video: ${meta.prompt}`})
      : el("img", {src: item.url, class: "result-media", alt: `Generated image for: ${meta.prompt}`});
    const caption = el("figcaption", {class: "hint"});
    if (!item.video) {
      media.addEventListener("load", () => {
        caption.textContent = `${media.naturalWidth}×${media.naturalHeight} PNG` +
          (meta.seed !== undefined ? ` · seed ${meta.seed + i}` : "");
      });
    }
    result.append(el("figure", {class: "result-figure"}, media, caption,
                     el("a", {href: item.url, download: name, class: "download"}, `Download ${name}`)));
  });
}

function showText(ctl, text) {
  ctl.partial = text;
  if (ctl.turn) {                 // chat: the answer streams into its turn of the conversation
    ctl.turn.answer.textContent = text;
    return ctl.turn.answer;
  }
  const result = $(".result", ctl.output);
  let answer = $(".answer", result);
  if (!answer) {
    result.replaceChildren();
    answer = el("div", {class: "answer", "aria-live": "polite"});
    result.append(answer);
  }
  answer.textContent = text;
  return answer;
}

function textDownload(ctl, text) {
  const url = URL.createObjectURL(new Blob([text], {type: "text/plain"}));
  $(".result", ctl.output).append(el("a", {href: url, download: `lance-${ctl.task}.txt`, class: "download"},
                                          "Download the answer"));
}

async function runTask(ctl) {
  if (ctl.controller) return;
  clearErrors(ctl);
  let req;
  try {
    req = await buildRequest(ctl);
  } catch (error) {
    showError(ctl, error);
    return;
  }
  const def = TASKS[ctl.task];
  const status = $(".status", ctl.output);
  const controller = new AbortController();
  ctl.controller = controller;
  setRunning(ctl, true);
  const started = performance.now();
  ctl.partial = "";
  if (def.chat) {
    ctl.turn = {user: addChatTurn(ctl, "user", req.prompt), assistant: addChatTurn(ctl, "assistant", "")};
    ctl.turn.answer = $("p", ctl.turn.assistant);
    ctl.turn.answer.classList.add("answer");
    ctl.form.elements.namedItem("prompt").value = "";
  }
  $(".result", ctl.output).replaceChildren();
  $(".progress", ctl.output).hidden = def.output === "text";
  if (def.output !== "text") setProgress(ctl, null);
  status.textContent = def.output === "text" ? "Waiting for the first token…" : "Preparing the context…";
  let outcome = null;
  try {
    const response = await api(req.path, {method: "POST", headers: apiHeaders(), body: JSON.stringify(req.body),
                                          signal: controller.signal});
    outcome = req.kind === "images" ? await readImages(ctl, response, req)
      : await readStream(ctl, response, req, started);
    const took = performance.now() - started;
    status.textContent = `Done in ${seconds(took)}${outcome.usage ? ` · ${usageText(outcome.usage, def)}` : ""}.`;
    if (def.chat) ctl.conversation.push({role: "user", content: req.prompt}, {role: "assistant", content: outcome.text});
    if (outcome.text !== undefined) textDownload(ctl, outcome.text);
    await addHistory({task: ctl.task, summary: req.summary, took, text: outcome.text, media: outcome.media});
  } catch (error) {
    const stoppedMidAnswer = error.name === "AbortError" && ctl.partial;
    if (def.chat && stoppedMidAnswer) {   // keep what arrived, as the turn's answer
      ctl.conversation.push({role: "user", content: req.prompt}, {role: "assistant", content: ctl.partial});
    } else if (def.chat) {                // the turn did not happen: give the message back to edit
      ctl.turn.user.remove();
      ctl.turn.assistant.remove();
      ctl.form.elements.namedItem("prompt").value = req.prompt;
    }
    if (error.name === "AbortError") {
      status.textContent = `Stopped after ${seconds(performance.now() - started)}; the server dropped the request.`;
    } else if (handleUnauthorized(error, () => runTask(ctl))) {
      status.textContent = "Waiting for an API key…";
    } else {
      showError(ctl, error, req.params);
    }
  } finally {
    const bar = $("progress", ctl.output);
    if (!bar.hasAttribute("value")) $(".progress", ctl.output).hidden = true;   // no step ever came
    ctl.controller = null;
    ctl.turn = null;
    setRunning(ctl, false);
  }
}

function usageText(usage, def) {
  if (def.output === "text") return `${usage.completion_tokens} tokens generated, ${usage.prompt_tokens} in the context`;
  return `${usage.prompt_tokens} context tokens, ${usage.completion_tokens} latent tokens`;
}

async function readStream(ctl, response, req, started) {
  const def = TASKS[ctl.task];
  const status = $(".status", ctl.output);
  let text = "";
  let media = [];
  let usage = null;
  let firstAt = null;
  for await (const chunk of sseEvents(response)) {
    if (chunk.error) throw new ApiError(response.status, chunk.error);
    if (chunk.usage) usage = chunk.usage;
    if (chunk.lance_progress) {
      const {step, total} = chunk.lance_progress;
      setProgress(ctl, step, total);
      if (firstAt === null) firstAt = performance.now() - started;
      status.textContent = step < total ? `Denoising… (context ready after ${seconds(firstAt)})`
        : "Decoding the image…";
    }
    const choice = chunk.choices && chunk.choices[0];
    const content = choice && choice.delta ? choice.delta.content : null;
    if (typeof content === "string" && content) {
      if (firstAt === null) { firstAt = performance.now() - started; }
      text += content;
      status.textContent = `Streaming… (first token after ${seconds(firstAt)})`;
      showText(ctl, text);
    } else if (Array.isArray(content)) {
      media = content.map(mediaPart).filter(Boolean);
      showMedia(ctl, media, req.summary);
    }
    if (choice && choice.finish_reason === "length") status.textContent = "Stopped at max tokens.";
  }
  if (def.output === "text") return {text, usage};
  if (!media.length) throw new ApiError(response.status, {message: "the stream ended without a result"});
  return {media, usage};
}

async function readImages(ctl, response, req) {
  $(".status", ctl.output).textContent = `Generating ${req.body.n} images…`;
  const body = await response.json();
  const media = body.data.map((d) => ({url: `data:image/png;base64,${d.b64_json}`, video: false}));
  const wrap = $(".progress", ctl.output);
  $("progress", wrap).max = 1;
  $("progress", wrap).value = 1;
  $(".progress-text", wrap).textContent = "Done (100 %)";
  showMedia(ctl, media, req.summary);
  return {media, usage: body.usage};
}

// -- chat ------------------------------------------------------------------------------------------

function addChatTurn(ctl, role, text) {
  const log = $(".conversation", ctl.output);
  const turn = el("div", {class: `turn turn-${role}`},
                  el("span", {class: "who", text: role === "user" ? "You" : "Lance"}), el("p", {text}));
  log.append(turn);
  log.scrollTop = log.scrollHeight;
  return turn;
}

// -- history (sessionStorage) ----------------------------------------------------------------------

function loadHistory() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY_STORE)) || []; } catch (e) { return []; }
}

function saveHistory(entries) {
  for (;;) {
    try {
      sessionStorage.setItem(HISTORY_STORE, JSON.stringify(entries));
      return;
    } catch (e) {            // storage full: drop the oldest entries
      if (!entries.length) return;
      entries.pop();
    }
  }
}

function thumbnail(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, THUMB_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      resolve({src: canvas.toDataURL("image/png"), width: img.naturalWidth, height: img.naturalHeight});
    };
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

async function addHistory({task, summary, took, text, media}) {
  const entry = {task, summary, took, at: new Date().toISOString()};
  if (text !== undefined) entry.text = text.slice(0, 2000);
  if (media && media.length) {
    entry.count = media.length;
    if (!media[0].video) entry.thumb = await thumbnail(media[0].url);
    else entry.video = true;
  }
  const entries = loadHistory();
  entries.unshift(entry);
  saveHistory(entries.slice(0, HISTORY_MAX));
  renderHistory();
}

function renderHistory() {
  const entries = loadHistory();
  const list = $("#history-list");
  list.replaceChildren();
  $("#history-empty").hidden = entries.length > 0;
  for (const entry of entries) {
    const label = TASKS[entry.task] ? TASKS[entry.task].label : entry.task;
    const s = entry.summary || {};
    const knobs = ["size", "num_inference_steps", "seed", "cfg_text_scale", "max_tokens", "temperature", "n"]
      .filter((k) => s[k] !== undefined).map((k) => `${k} ${s[k]}`).join(", ");
    const when = new Date(entry.at).toLocaleTimeString();
    list.append(el("li", {class: "history-item"},
      entry.thumb ? el("img", {src: entry.thumb.src, class: "history-thumb",
                               alt: `${label} result, ${entry.thumb.width}×${entry.thumb.height}`}) : null,
      el("div", {class: "history-text"},
         el("p", {class: "history-head"}, el("strong", {text: label}), ` · ${when} · ${seconds(entry.took)}`),
         s.prompt ? el("p", {class: "history-prompt", text: s.prompt}) : null,
         knobs ? el("p", {class: "hint", text: knobs}) : null,
         entry.text !== undefined ? el("p", {class: "history-answer", text: entry.text}) : null,
         entry.video ? el("p", {class: "hint", text: "video"}) : null)));
  }
}

// -- start -----------------------------------------------------------------------------------------

async function init() {
  const model = await loadModel();
  if (!model) return;
  state.model = model;
  describeModel(model);
  const served = (model.lance && model.lance.tasks) || ["t2i", "image_edit", "x2t_image", "chat"];
  const tasks = Object.keys(TASKS).filter((t) => served.includes(t));
  const specs = knobSpecs(model);
  const controls = new Map(tasks.map((task) => [task, buildPanel(task, specs)]));
  buildTabs(tasks, controls);
}

document.addEventListener("DOMContentLoaded", () => {
  setupApiKey();
  $("#history-clear").addEventListener("click", () => { sessionStorage.removeItem(HISTORY_STORE); renderHistory(); });
  renderHistory();
  init();
});
