// vitlab serve's page: upload an image, show the top-5 classes and the attention maps the API returns.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;   // GET /v1/model
let result = null;  // the last POST /v1/attention (format=array)
let shown = null;   // the model's input image of that result, decoded

// The jet colour map on [0, 1], as matplotlib's (piecewise linear).
function jet(v) {
  const c = (x) => Math.max(0, Math.min(1, x));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

// Draw the image with a (rows x cols) map over it: scaled to [0, 1], coloured, smoothed, half transparent.
function drawOverlay(canvas, image, map) {
  const rows = map.length, cols = map[0].length, flat = map.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat), span = hi - lo || 1;
  const small = document.createElement("canvas");
  small.width = cols; small.height = rows;
  const sctx = small.getContext("2d"), pixels = sctx.createImageData(cols, rows);
  flat.forEach((v, i) => {
    const [r, g, b] = jet((v - lo) / span);
    pixels.data.set([r * 255, g * 255, b * 255, 255], 4 * i);
  });
  sctx.putImageData(pixels, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = 1;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  canvas.dataset.drawn = "1";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
  if (message) document.body.dataset.state = "error";
}

function showPredictions(predictions) {
  const list = $("predictions");
  list.replaceChildren(...predictions.map((p) => {
    const li = document.createElement("li");
    li.innerHTML = '<span class="label"></span><span class="bar"><div></div></span><span class="prob"></span>';
    li.querySelector(".label").textContent = li.querySelector(".label").title = p.label;
    li.querySelector(".bar div").style.width = `${(100 * p.prob).toFixed(1)}%`;
    li.querySelector(".prob").textContent = `${(100 * p.prob).toFixed(1)}%`;
    return li;
  }));
}

// The chosen layer's heads: small maps to click, and the chosen head (or their mean) large.
function showHeads() {
  const layer = Number($("layer").value), head = $("head").value;
  const maps = result.heads[layer];
  const big = head === "mean"
    ? maps[0].map((row, i) => row.map((_, j) => maps.reduce((s, m) => s + m[i][j], 0) / maps.length))
    : maps[Number(head)];
  drawOverlay($("head-map"), shown, big);
  $("heads").replaceChildren(...maps.map((m, h) => {
    const fig = document.createElement("figure"), canvas = document.createElement("canvas");
    canvas.width = canvas.height = 96;
    drawOverlay(canvas, shown, m);
    fig.append(canvas);
    const cap = document.createElement("figcaption");
    cap.textContent = `head ${h}`;
    fig.append(cap);
    fig.classList.toggle("chosen", String(h) === head);
    fig.onclick = () => { $("head").value = String(h); showHeads(); };
    return fig;
  }));
}

async function readJSON(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function analyse(file) {
  showError("");
  document.body.dataset.state = "working";
  $("upload").src = URL.createObjectURL(file);
  $("upload-name").textContent = file.name;
  $("upload-figure").hidden = false;
  const form = new FormData();
  form.append("file", file);
  try {
    const url = model.attention ? "/v1/attention?format=array&k=5" : "/v1/predict?k=5";
    const body = await readJSON(await fetch(url, { method: "POST", body: form }));
    showPredictions(body.predictions);
    $("results").hidden = false;
    $("attention").hidden = !model.attention;
    if (model.attention) {
      result = body;
      shown = new Image();
      shown.src = body.image;
      await shown.decode();
      drawOverlay($("rollout"), shown, body.rollout);
      showHeads();
    }
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err.message);
  }
}

function showCard(info) {
  $("model-name").textContent = info.name;
  const accuracy = info.accuracy
    ? Object.entries(info.accuracy).filter(([k]) => k !== "source").map(([k, v]) => `${k} ${v}`).join(", ")
    : "not recorded";
  const labels = info.labels.length > 12
    ? `${info.labels.slice(0, 12).join(", ")}, ... (${info.labels.length} in all)` : info.labels.join(", ");
  const rows = [["name", info.name], ["parameters", info.parameters.toLocaleString("en")],
    ["resolution", info.resolution.join(" x ")], ["labels", labels], ["recorded accuracy", accuracy],
    ...Object.entries(info.card).filter(([k]) => !["model", "parameters", "resolution", "class names", "checkpoint", "file"]
      .includes(k))];
  $("card-table").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
    th.textContent = k; td.textContent = v;
    tr.append(th, td);
    return tr;
  }));
  if (info.posemb) {
    $("posemb").src = "/v1/posemb.png";
    $("posemb-figure").hidden = false;
  }
  if (info.attention) {
    const { layers, heads } = info.attention;
    $("layer").replaceChildren(...[...Array(layers).keys()].map((i) => new Option(`${i + 1} of ${layers}`, i)));
    $("layer").value = String(layers - 1);  // the last layer first
    $("head").replaceChildren(new Option("mean", "mean"), ...[...Array(heads).keys()].map((h) => new Option(h, h)));
    $("token-note").textContent = info.card.architecture.includes("pool gap")
      ? "(mean over patch queries: the model pools by averaging)" : "(class-token query)";
  }
}

async function start() {
  try {
    model = await readJSON(await fetch("/v1/model"));
    showCard(model);
    document.body.dataset.state = "ready";
  } catch (err) {
    showError(`cannot read the model: ${err.message}`);
  }
  $("file").addEventListener("change", (e) => e.target.files[0] && analyse(e.target.files[0]));
  $("layer").addEventListener("change", () => result && showHeads());
  $("head").addEventListener("change", () => result && showHeads());
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) analyse(e.dataTransfer.files[0]);
  });
}

start();
