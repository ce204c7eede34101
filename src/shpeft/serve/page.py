"""The page at ``/``: pick or drop an image, see every task's prediction and heat map.

One self-contained HTML document (no external script, style, font or icon: the server may run
offline), using only ``GET /tasks`` and ``POST /predict?heatmap=true``. Server strings are
inserted with ``textContent``, never as HTML.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>shpeft serve</title>
<style>
  :root { --fg: #1d2433; --muted: #5b6475; --line: #d9dde5; --accent: #2f6fde; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  header { padding: 18px 28px; background: #fff; border-bottom: 1px solid var(--line); }
  h1 { margin: 0; font-size: 20px; }
  header p { margin: 4px 0 0; color: var(--muted); }
  main { padding: 22px 28px; max-width: 1200px; }
  #drop { display: flex; gap: 18px; align-items: center; padding: 18px; background: #fff;
          border: 2px dashed var(--line); border-radius: 10px; }
  #drop.over { border-color: var(--accent); background: #eef3fd; }
  #preview { width: 112px; height: 112px; object-fit: contain; background: #eef0f4;
             border-radius: 6px; }
  #preview[hidden] { display: none; }
  #status { color: var(--muted); min-height: 1.4em; margin: 12px 0; }
  #error { color: #a31515; background: #fdecec; border: 1px solid #f3b9b9; border-radius: 6px;
           padding: 8px 12px; margin: 12px 0; }
  #error:empty { display: none; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr));
             gap: 16px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px; }
  .card h2 { margin: 0; font-size: 16px; }
  .meta { color: var(--muted); font-size: 13px; }
  .pred { font-size: 17px; font-weight: 600; margin: 8px 0; }
  .bar { display: grid; grid-template-columns: 9em 1fr 4.2em; gap: 6px; align-items: center;
         font-size: 13px; margin: 3px 0; }
  .bar .track { background: #eef0f4; border-radius: 4px; height: 10px; overflow: hidden; }
  .bar .fill { background: var(--accent); height: 100%; }
  .bar .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .bar .pct { text-align: right; font-variant-numeric: tabular-nums; }
  .heat { width: 100%; border-radius: 6px; margin-top: 10px; image-rendering: auto; }
</style>
</head>
<body>
<header>
  <h1>shpeft serve</h1>
  <p id="summary">Loading tasks&hellip;</p>
</header>
<main>
  <label id="drop" for="file">
    <img id="preview" alt="the chosen image" hidden>
    <span>
      <strong>Choose or drop an image</strong> (PNG, JPEG, TIFF, BMP or DICOM)<br>
      <input id="file" type="file" accept="image/*,.dcm,.dicom,.tif,.tiff">
      <br><input id="heat" type="checkbox" checked> <span>heat maps for the predicted class
      (gradient-weighted attention rollout, Chefer et al. 2021)</span>
    </span>
  </label>
  <div id="status" aria-live="polite"></div>
  <div id="error" role="alert"></div>
  <section id="results"></section>
</main>
<script>
"use strict";
const $ = (sel) => document.querySelector(sel);
let tasks = [];

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

function taskCard(info, result) {
  const card = el("article", "card");
  card.dataset.task = info.name;
  card.append(el("h2", "", info.name));
  const test = info.test && info.test.macro_f1 != null ? ", test macro F1 " + pct(info.test.macro_f1) : "";
  card.append(el("div", "meta", info.method + " (" + info.served_as + ")" + test));
  if (!result) {
    card.append(el("div", "meta", info.classes.join(" / ")));
    return card;
  }
  const best = result.probabilities.indexOf(Math.max(...result.probabilities));
  card.append(el("div", "pred", result.prediction + " " + pct(result.probabilities[best])));
  result.classes.forEach((name, i) => {
    const row = el("div", "bar");
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = pct(result.probabilities[i]);
    track.append(fill);
    row.append(el("span", "name", name), track, el("span", "pct", pct(result.probabilities[i])));
    row.title = name;
    card.append(row);
  });
  if (result.heatmap) {
    const img = el("img", "heat");
    img.alt = "heat map of " + info.name + " for " + result.prediction;
    img.src = result.heatmap;
    card.append(img);
  }
  return card;
}

function show(results) {
  const byName = new Map((results || []).map((r) => [r.task, r]));
  $("#results").replaceChildren(...tasks.map((t) => taskCard(t, byName.get(t.name))));
}

async function errorText(response) {
  try { return (await response.json()).detail || response.statusText; }
  catch (_) { return response.status + " " + response.statusText; }
}

async function loadTasks() {
  const response = await fetch("tasks");
  if (!response.ok) { $("#summary").textContent = await errorText(response); return; }
  const body = await response.json();
  tasks = body.tasks;
  let text = tasks.length + " task(s) served";
  if (body.refused.length) text += "; refused: " + body.refused.map((r) => r.name + " (" + r.reason + ")").join("; ");
  $("#summary").textContent = text;
  show(null);
}

async function analyse(file) {
  $("#error").textContent = "";
  const preview = $("#preview");
  if (/^image\\/(png|jpeg|gif|webp|bmp)$/.test(file.type)) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  } else {
    preview.removeAttribute("src");
    preview.hidden = true;
  }
  $("#status").textContent = "Analysing " + file.name + "\\u2026";
  const form = new FormData();
  form.append("file", file, file.name);
  const heat = $("#heat").checked ? "true" : "false";
  const response = await fetch("predict?heatmap=" + heat, { method: "POST", body: form });
  if (!response.ok) {
    $("#status").textContent = "";
    $("#error").textContent = await errorText(response);
    show(null);
    return;
  }
  const body = await response.json();
  show(body.predictions);
  $("#status").textContent = file.name + ": " + body.predictions.length + " task(s) done";
}

$("#file").addEventListener("change", (e) => { if (e.target.files.length) analyse(e.target.files[0]); });
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
});
loadTasks();
</script>
</body>
</html>
"""
