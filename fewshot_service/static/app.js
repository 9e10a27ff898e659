// The fewshot page: speaks only the public REST API (anything it does, curl can do).
const $ = (id) => document.getElementById(id);
// The key stays in this tab (sessionStorage) unless the user ticks "remember" (localStorage).
const state = { key: sessionStorage.getItem("fewshot-key") || localStorage.getItem("fewshot-key") || "",
                gallery: null, encoder: null, enroll: [], thumbs: [] };

function say(text, error = false) {
  const box = $("message");
  box.textContent = text;
  box.className = error ? "error" : "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-Key", state.key);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    if (response.status === 401) message = `${message} (enter an API key above)`;
    if (response.status === 403) message = `${message} (this key may only read)`;
    throw new Error(message);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();
const enc = encodeURIComponent;

// The service names a bad image by its place ("image 2: ..."); the page knows its file name.
function named(message, files) {
  return message.replace(/^image (\d+): /, (whole, n) => (files[n - 1] ? `${files[n - 1].name}: ` : whole));
}

// ------------------------------------------------------------------ galleries
async function showGalleries() {
  state.gallery = null;
  $("gallery-view").hidden = true;
  $("galleries-view").hidden = false;
  try {
    const [galleries, ready] = await Promise.all([json("/v1/galleries"), json("/readyz")]);
    const body = $("galleries").tBodies[0];
    body.replaceChildren(...galleries.map((g) => {
      const row = document.createElement("tr");
      const link = Object.assign(document.createElement("a"), { href: `#g/${enc(g.name)}`, textContent: g.name });
      row.append(cell(link), cell(g.encoder || ""), cell(g.examples ?? "—"));
      return row;
    }));
    if (!galleries.length) body.append(Object.assign(document.createElement("tr"), { innerHTML: '<td colspan="3">No gallery yet: create one below.</td>' }));
    $("new-encoder").replaceChildren(...Object.keys(ready.encoders || { [ready.encoder]: {} }).map(
      (name) => new Option(name, name, false, name === ready.encoder)));
  } catch (error) { say(error.message, true); }
}

function cell(content) {
  const td = document.createElement("td");
  td.append(content);
  return td;
}

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("new-name").value.trim();
  try {
    await json("/v1/galleries", { method: "POST", headers: { "content-type": "application/json" },
                                  body: JSON.stringify({ name, encoder: $("new-encoder").value }) });
    say(`Gallery ${name} created.`);
    location.hash = `#g/${enc(name)}`;
  } catch (error) { say(error.message, true); }
});

// ------------------------------------------------------------------ one gallery
async function showGallery(name) {
  state.gallery = name;
  $("galleries-view").hidden = true;
  $("gallery-view").hidden = false;
  $("gallery-title").textContent = name;
  $("results").replaceChildren();
  $("recognize-stage").hidden = true;
  try {
    const info = await json(`/v1/galleries/${enc(name)}`);
    state.encoder = info.encoder;
    $("gallery-info").textContent = `Encoder ${info.encoder || "?"}, ${info.classes} class(es), ${info.examples} example(s)`;
    await showClasses();
  } catch (error) { say(error.message, true); }
}

$("delete-gallery").addEventListener("click", async () => {
  const name = state.gallery;
  if (!confirm(`Delete gallery ${name} with all its classes, examples and images? This cannot be undone.`)) return;
  try {
    await json(`/v1/galleries/${enc(name)}`, { method: "DELETE" });
    say(`Gallery ${name} deleted.`);
    location.hash = "";
  } catch (error) { say(error.message, true); }
});

async function showClasses() {
  state.thumbs.forEach(URL.revokeObjectURL);
  state.thumbs = [];
  const g = enc(state.gallery);
  const page = await json(`/v1/galleries/${g}/classes?limit=1000`);
  const items = await Promise.all(page.classes.map(async (c) => {
    const detail = await json(`/v1/galleries/${g}/classes/${enc(c.label)}`);
    return classItem(detail);
  }));
  $("classes").replaceChildren(...items);
  if (!items.length) $("classes").append(Object.assign(document.createElement("li"), { textContent: "No class yet: enroll one above." }));
}

function classItem(detail) {
  const li = document.createElement("li");
  li.dataset.label = detail.label;
  const head = document.createElement("div");
  head.className = "class-head";
  const title = Object.assign(document.createElement("strong"), { textContent: `${detail.label} (${detail.count})` });
  const rename = Object.assign(document.createElement("input"), { value: detail.label, size: 12 });
  rename.setAttribute("aria-label", `New name for ${detail.label}`);
  const renameButton = Object.assign(document.createElement("button"), { type: "button", className: "quiet", textContent: "Rename" });
  renameButton.onclick = () => renameClass(detail.label, rename.value.trim());
  const remove = Object.assign(document.createElement("button"), { type: "button", className: "danger", textContent: "Delete class" });
  remove.setAttribute("aria-label", `Delete class ${detail.label}`);
  remove.onclick = () => deleteClass(detail.label);
  head.append(title, rename, renameButton, remove);
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  for (const id of detail.ids) thumbs.append(thumbItem(detail.label, id));
  li.append(head, thumbs);
  return li;
}

function thumbItem(label, id) {
  const box = document.createElement("div");
  box.className = "thumb";
  const img = Object.assign(document.createElement("img"), { alt: `${label}, example ${id}` });
  api(`/v1/galleries/${enc(state.gallery)}/examples/${id}/thumbnail`)
    .then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); state.thumbs.push(img.src); })
    .catch(() => { img.alt = `${label}, example ${id} (no image kept)`; });
  const remove = Object.assign(document.createElement("button"), { type: "button", className: "danger", textContent: "×" });
  remove.setAttribute("aria-label", `Delete example ${id} of ${label}`);
  remove.onclick = async () => {
    try { await api(`/v1/galleries/${enc(state.gallery)}/examples/${id}`, { method: "DELETE" }); say(`Example ${id} deleted.`); await showClasses(); }
    catch (error) { say(error.message, true); }
  };
  box.append(img, remove);
  return box;
}

async function renameClass(label, to) {
  if (!to || to === label) return;
  try {
    await json(`/v1/galleries/${enc(state.gallery)}/classes/${enc(label)}`, {
      method: "PATCH", headers: { "content-type": "application/json" }, body: JSON.stringify({ label: to }) });
    say(`Renamed ${label} to ${to}.`);
    await showClasses();
  } catch (error) { say(error.message, true); }
}

async function deleteClass(label) {
  if (!confirm(`Delete class ${label} and its examples?`)) return;
  try {
    const r = await json(`/v1/galleries/${enc(state.gallery)}/classes/${enc(label)}`, { method: "DELETE" });
    say(`Deleted ${label} (${r.removed} example${r.removed === 1 ? "" : "s"}).`);
    await showClasses();
  } catch (error) { say(error.message, true); }
}

// ------------------------------------------------------------------ enroll: files, drop, camera
function dropZone(zone, input, take) {
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); take([...e.dataTransfer.files]); });
  input.addEventListener("change", () => take([...input.files]));
}

const isImage = (f) => f.type.startsWith("image/");

function chooseEnroll(files) {
  const skipped = files.filter((f) => !isImage(f));
  state.enroll = files.filter(isImage);
  $("enroll-chosen").textContent = state.enroll.length ? `${state.enroll.length} image(s): ${state.enroll.map((f) => f.name).join(", ")}` : "No image chosen.";
  if (skipped.length) say(`Not an image, left out: ${skipped.map((f) => f.name).join(", ")}.`, true);
}

dropZone($("enroll-drop"), $("enroll-files"), chooseEnroll);

$("camera-start").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    const video = $("camera");
    video.srcObject = stream;
    video.hidden = false;
    $("camera-shot").hidden = false;
    await video.play();
  } catch (error) { say(`Camera unavailable: ${error.message}`, true); }
});

$("camera-shot").addEventListener("click", () => {
  const video = $("camera");
  const canvas = Object.assign(document.createElement("canvas"), { width: video.videoWidth, height: video.videoHeight });
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => chooseEnroll([...state.enroll, new File([blob], `camera-${Date.now()}.jpg`, { type: "image/jpeg" })]), "image/jpeg", 0.92);
});

$("enroll-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const label = $("enroll-label").value.trim();
  if (!state.enroll.length) { say("Choose or drop at least one image (JPEG, PNG, WebP, ...) first.", true); return; }
  const form = new FormData();
  state.enroll.forEach((file) => form.append("files", file, file.name));
  try {
    const r = await json(`/v1/galleries/${enc(state.gallery)}/classes/${enc(label)}/examples`, { method: "POST", body: form });
    say(`Enrolled ${r.ids.length} image(s) into ${r.label} (${r.count} in all)${r.faces ? `; faces found: ${r.faces.join(", ")}` : ""}.`);
    chooseEnroll([]);
    $("enroll-files").value = "";
    await showClasses();
  } catch (error) { say(named(error.message, state.enroll), true); }
});

// ------------------------------------------------------------------ recognise
dropZone($("recognize-drop"), $("recognize-file"), (files) => {
  if (!files.length) return;
  if (!isImage(files[0])) { say(`${files[0].name} is not an image: drop a JPEG, PNG, WebP, ...`, true); return; }
  recognise(files[0]);
});

function clearStage() {  // nothing half-shown after a failure: no broken image, no stale boxes or results
  const img = $("recognize-image");
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  $("recognize-stage").hidden = true;
  $("results").replaceChildren();
}

async function recognise(file) {
  clearStage();
  const img = $("recognize-image");
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    img.src = URL.createObjectURL(file);
    await img.decode();
  } catch { clearStage(); say(`${file.name}: the browser cannot show it; is it an image?`, true); return; }
  $("recognize-stage").hidden = false;
  try {
    const r = await json(`/v1/galleries/${enc(state.gallery)}/recognize?k=3`, { method: "POST", body: form });
    drawBoxes(r.results);
    const list = r.results.map((result, i) => resultItem(result, i, r));
    if (!list.length) list.push(Object.assign(document.createElement("li"), { textContent: r.faces ? "No face found in this image." : "No answer." }));
    $("results").replaceChildren(...list);
    say("");
  } catch (error) { clearStage(); say(named(error.message, [file]), true); }
}

function resultItem(result, i, answer) {
  const li = document.createElement("li");
  li.className = "result";
  const best = result.matches[0];
  const verdict = document.createElement("p");
  const name = result.unknown ? "unknown" : best.label;
  verdict.innerHTML = `<span class="${result.unknown ? "unknown" : "known"}" data-testid="prediction"></span>`;
  verdict.firstChild.textContent = result.box ? `Face ${i + 1}: ${name}` : name;
  const onMargin = result.decision === "margin";  // the threshold is on best - 0.5 x runner-up, not on a bar
  const threshold = result.threshold == null ? "no threshold yet (one class)" :
    `${onMargin && result.decision_value != null ? `margin over the runner-up ${result.decision_value.toFixed(3)}, ` : ""}` +
    `threshold ${result.threshold.toFixed(3)} (${answer.threshold_source || "gallery"})`;
  verdict.append(` — ${threshold}`);
  li.append(verdict);
  result.matches.forEach((match, rank) => {  // a bar per match: its score, coloured by the decision
    const accepted = result.threshold == null || (onMargin ? rank === 0 && !result.unknown : match.score >= result.threshold);
    const bar = document.createElement("div");
    bar.className = "bar";
    const track = Object.assign(document.createElement("div"), { className: "track" });
    track.setAttribute("role", "meter");
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "1");
    track.setAttribute("aria-valuenow", match.score.toFixed(3));
    track.setAttribute("aria-label", `${match.label} score, ${accepted ? "above" : "below"} the threshold`);
    const fill = Object.assign(document.createElement("div"), { className: `fill ${accepted ? "accepted" : "below"}` });
    fill.style.width = `${Math.max(0, Math.min(1, match.score)) * 100}%`;
    track.append(fill);
    if (result.threshold != null && !onMargin) {  // a score threshold is drawn on the bars
      const line = Object.assign(document.createElement("div"), { className: "threshold", title: `threshold ${result.threshold.toFixed(3)}` });
      line.style.left = `${Math.max(0, Math.min(1, result.threshold)) * 100}%`;
      track.append(line);
    }
    bar.append(Object.assign(document.createElement("span"), { textContent: match.label }), track,
               Object.assign(document.createElement("span"), { textContent: match.score.toFixed(3) }));
    li.append(bar);
  });
  return li;
}

function drawBoxes(results) {
  const img = $("recognize-image");
  const canvas = $("recognize-boxes");
  canvas.width = img.naturalWidth || 1;
  canvas.height = img.naturalHeight || 1;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const scale = Math.max(1, canvas.width / 300);
  results.forEach((result, i) => {
    if (!result.box) return;
    const [x0, y0, x1, y1] = result.box;
    ctx.lineWidth = 2 * scale;
    ctx.strokeStyle = result.unknown ? "#b42318" : "#147a3d";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.font = `${12 * scale}px system-ui`;
    const text = `${i + 1}: ${result.unknown ? "unknown" : result.matches[0].label}`;
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillRect(x0, Math.max(0, y0 - 16 * scale), ctx.measureText(text).width + 8 * scale, 16 * scale);
    ctx.fillStyle = "white";
    ctx.fillText(text, x0 + 4 * scale, Math.max(12 * scale, y0 - 4 * scale));
  });
}

// ------------------------------------------------------------------ keys and routing
$("api-key").value = state.key;
$("remember-key").checked = Boolean(localStorage.getItem("fewshot-key"));
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  const remember = $("remember-key").checked && state.key;
  sessionStorage.setItem("fewshot-key", state.key);
  if (remember) localStorage.setItem("fewshot-key", state.key);
  else localStorage.removeItem("fewshot-key");
  say(state.key ? `Key set${remember ? " and remembered in this browser" : " for this tab"}.` : "Key cleared.");
  route();
});

function route() {
  const match = location.hash.match(/^#g\/(.+)$/);
  if (match) showGallery(decodeURIComponent(match[1]));
  else showGalleries();
}

window.addEventListener("hashchange", route);
$("home").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; route(); });
route();
