// alignsearch search page: calls the JSON API of the server that serves it; no build step, no outside assets.
"use strict";

const $ = (id) => document.getElementById(id);
const keyField = $("api-key");
keyField.value = sessionStorage.getItem("alignsearch-key") || "";
keyField.addEventListener("input", () => sessionStorage.setItem("alignsearch-key", keyField.value.trim()));

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const key = keyField.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function number(id, fallback) {
  const v = parseInt($(id).value, 10);
  return Number.isFinite(v) && v > 0 ? v : fallback;
}

function searchParams() {
  const k = Math.min(number("k", 12), 100);
  return { k, candidates: Math.min(Math.max(number("candidates", 100), k), 1000) };
}

async function call(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    if (response.status === 401) $("settings").open = true; // the key goes there
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function setStatus(id, text, error) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", Boolean(error));
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "style") Object.entries(v).forEach(([name, value]) => node.style.setProperty(name, value));
    else node.setAttribute(k, v);
  }
  for (const c of children || []) node.appendChild(c);
  return node;
}

// Thumbnails: a plain <img src> when the server needs no key; with a key, fetched with the
// Authorization header (an <img> cannot send one) and shown from a blob URL.
let blobUrls = [];
function showImage(img, uri) {
  if (!keyField.value.trim()) {
    img.src = uri;
    return;
  }
  fetch(uri, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      blobUrls.push(url);
      img.src = url;
    })
    .catch(() => img.classList.add("broken"));
}
function releaseImages() {
  blobUrls.forEach((u) => URL.revokeObjectURL(u));
  blobUrls = [];
}

function imageUri(id) {
  return "/images/" + id.split("/").map(encodeURIComponent).join("/");
}

// -- word -> region overlay --------------------------------------------------------------------------------

const HUES = [0, 120, 220, 35, 280, 185, 320, 75, 160, 250, 15, 200];
const hue = (i) => HUES[i % HUES.length]; // one colour per query word, neighbours far apart

function overlay(grounding) {
  // One box per grid cell that some query word matched best; its words show on hover. Opacity follows the
  // word-region similarity, relative to the best word of this result.
  const words = grounding.filter((g) => Array.isArray(g.cell) && Array.isArray(g.grid));
  const best = Math.max(1e-6, ...words.map((g) => g.similarity));
  const cells = new Map();
  words.forEach((g, i) => {
    const key = g.cell.join(",");
    if (!cells.has(key)) cells.set(key, { g, words: [] });
    cells.get(key).words.push({ word: g.word, similarity: g.similarity, i });
  });
  const boxes = [];
  for (const { g, words: ws } of cells.values()) {
    const [rows, cols] = g.grid;
    const [r, c] = g.cell;
    const strength = Math.max(...ws.map((w) => w.similarity)) / best;
    const label = ws.map((w) => w.word).join(" · ");
    boxes.push(el("div", {
      class: "cell", "data-word": ws.map((w) => w.word).join(" "), "data-cell": g.cell.join(","),
      title: ws.map((w) => `${w.word}: ${w.similarity.toFixed(3)}`).join("\n"),
      style: {
        left: `${(100 * c) / cols}%`, top: `${(100 * r) / rows}%`, width: `${100 / cols}%`, height: `${100 / rows}%`,
        "--hue": String(hue(ws[0].i)), "--alpha": String(0.15 + 0.45 * Math.max(0, strength)),
      },
    }, [el("span", { class: "word", text: label })]));
  }
  return boxes;
}

function legend(grounding, thumb) {
  // the query's words under the image; hovering one lights up the cell it matched
  return el("div", { class: "legend" }, grounding.filter((g) => g.cell).map((g, i) => {
    const chip = el("span", { class: "chip", "data-cell": g.cell.join(","), style: { "--hue": String(hue(i)) },
                              text: g.word, title: `${g.word} -> row ${g.cell[0] + 1}, col ${g.cell[1] + 1} ` +
                                                   `(similarity ${g.similarity.toFixed(3)})` });
    const box = () => thumb.querySelector(`.cell[data-cell="${g.cell.join(",")}"]`);
    chip.addEventListener("mouseenter", () => box()?.classList.add("lit"));
    chip.addEventListener("mouseleave", () => box()?.classList.remove("lit"));
    return chip;
  }));
}

// -- text -> images ----------------------------------------------------------------------------------------

function imageCard(r) {
  const img = el("img", { alt: r.id, loading: "lazy" });
  showImage(img, r.uri);
  const thumb = el("div", { class: "thumb" }, [img, ...(r.grounding ? overlay(r.grounding) : [])]);
  return el("figure", { class: "card", "data-id": r.id, "data-rank": String(r.rank) }, [
    thumb,
    el("figcaption", { class: "meta" }, [
      el("div", { class: "score", text: `#${r.rank} score ${r.score.toFixed(3)}` }),
      el("div", { class: "parts", text: `global ${r.global_score.toFixed(3)} · local ${r.local_score.toFixed(3)}` }),
      el("div", { class: "id", text: r.id }),
      ...(r.grounding ? [legend(r.grounding, thumb)] : []),
    ]),
  ]);
}

async function searchText() {
  const query = $("query").value.trim();
  if (!query) return;
  const explain = $("explain").checked;
  setStatus("text-status", "searching…");
  try {
    const res = await call("/search/text", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(Object.assign({ query, explain }, searchParams())),
    });
    releaseImages();
    $("image-results").replaceChildren(...res.results.map(imageCard));
    $("image-results").classList.toggle("explained", explain);
    const t = res.timings_ms;
    setStatus("text-status", `${res.results.length} images in ${t.total.toFixed(0)} ms ` +
      `(encode ${t.encode.toFixed(0)}, first stage ${t.coarse.toFixed(1)}, rerank ${t.rerank.toFixed(1)})` +
      (res.truncated ? " · query truncated" : "") +
      (explain ? " · hover a box or a word to see what matched where" : ""));
  } catch (err) {
    setStatus("text-status", err.message, true);
  }
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchText();
});
$("explain").addEventListener("change", () => {
  if ($("query").value.trim()) searchText();
});

// -- image -> captions -------------------------------------------------------------------------------------

async function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus("image-status", `${file.name} is not an image`, true);
    return;
  }
  const preview = el("img", { src: URL.createObjectURL(file), alt: "your image" });
  preview.addEventListener("load", () => URL.revokeObjectURL(preview.src), { once: true });
  $("upload-preview").replaceChildren(preview);
  setStatus("image-status", "searching…");
  const form = new FormData();
  form.append("file", file);
  const params = searchParams();
  form.append("k", String(params.k));
  form.append("candidates", String(params.candidates));
  try {
    const res = await call("/search/image", { method: "POST", headers: authHeaders(), body: form });
    $("caption-results").replaceChildren(...res.results.map((r) => {
      const parts = [el("span", { class: "caption", text: r.caption }),
                     el("span", { class: "score", text: `score ${r.score.toFixed(3)}` })];
      if (r.image_id) {
        const img = el("img", { class: "mini", alt: r.image_id, title: r.image_id, loading: "lazy" });
        showImage(img, imageUri(r.image_id));
        parts.unshift(img);
      }
      return el("li", { "data-id": r.id }, parts);
    }));
    setStatus("image-status", res.results.length
      ? `${res.results.length} captions in ${res.timings_ms.total.toFixed(0)} ms`
      : "no captions in this index");
  } catch (err) {
    setStatus("image-status", err.message, true);
  }
}

$("file").addEventListener("change", (event) => searchImage(event.target.files[0]));
const drop = $("drop-zone");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => searchImage(e.dataTransfer.files[0]));
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
// a file dropped anywhere else on the page would make the browser navigate away to it
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

// -- the index this page searches -------------------------------------------------------------------------

fetch("/readyz").then((r) => r.json()).then((s) => {
  if (s.status === "ready") $("index-info").textContent = `${s.images} images · ${s.captions} captions`;
}).catch(() => {});
