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

// -- how strong the matches are ------------------------------------------------------------------------------
// /search/text returns its top k whatever their scores and says how strong they are: `match` on each result
// (its global score reaches the threshold), `min_score` (the threshold applied: the model's calibrated one unless
// the request sent its own; null: none) and `no_match` (no result reaches it). The page dims the results below the
// threshold and says when none reaches it. `below_min_score` (how many results a server left out) is not part of
// the API: it is read only if a server sends it, and then "Show them" asks again with min_score -1.
// /search/image has no threshold: its results are shown as they are.

let textThreshold = null; // the last min_score the text search applied

function strength(res, fallback) {
  const min = typeof res.min_score === "number" && res.min_score > -1 ? res.min_score : fallback;
  const weak = res.results.map((r) => typeof min === "number" && r.global_score < min);
  return { min, weak, hidden: res.below_min_score || 0,
           none: res.no_match === true || (weak.length > 0 && weak.every(Boolean)) };
}

function notice(id, kind, title, text, action) {
  // a note above the results: kind "warn" (no good match) or "info"; empty kind hides it
  const node = $(id);
  node.hidden = !kind;
  node.className = `notice ${kind || ""}`;
  const parts = kind ? [el("strong", { text: title }), document.createTextNode(text)] : [];
  if (kind && action) {
    const button = el("button", { type: "button", class: "link", text: action.text });
    button.addEventListener("click", action.run);
    parts.push(document.createTextNode(" "), button);
  }
  node.replaceChildren(...parts);
}

function matchNotice(id, what, s, shown, showAll) {
  const bar = s.min !== null && s.min !== undefined ? ` (global score ${s.min.toFixed(2)})` : "";
  if (s.none && !shown) {
    notice(id, "warn", "No good match", ` No ${what.slice(0, -1)} in this index clears the match threshold${bar}: ` +
      "nothing here looks like what you described.", showAll && { text: "Show the closest anyway", run: showAll });
  } else if (s.none) {
    notice(id, "warn", "No good match", ` None of these ${what} clears the match threshold${bar}; ` +
      "they are the closest ones, dimmed.");
  } else if (s.hidden && showAll) {
    notice(id, "info", `${s.hidden} weaker ${s.hidden === 1 ? what.slice(0, -1) : what} left out`,
      ` (below the match threshold${bar}).`, { text: "Show them", run: showAll });
  } else {
    notice(id, "");
  }
}

// -- word -> region overlay --------------------------------------------------------------------------------

const HUES = [0, 120, 220, 35, 280, 185, 320, 75, 160, 250, 15, 200];
const hue = (i) => HUES[i % HUES.length]; // one colour per shown word, neighbours far apart
const percent = (x) => `${Math.round(100 * x)}%`;

function groundedWords(grounding) {
  // The words the API grounded on a grid cell, each with its colour: the overlay and the legend share them.
  // Whole words, no stopwords or punctuation, and a `confidence` per word where the API gives them.
  return (grounding || []).filter((g) => Array.isArray(g.cell) && Array.isArray(g.grid))
    .map((g, i) => Object.assign({}, g, { i, hue: hue(i) }));
}

function wordNote(w) {
  const conf = typeof w.confidence === "number" ? ` · confidence ${percent(w.confidence)}` : "";
  return `${w.word} -> row ${w.cell[0] + 1}, col ${w.cell[1] + 1}${conf} · similarity ${w.similarity.toFixed(3)}`;
}

function fitLabel(cell) {
  // keep the hover label inside the photo: shift it left or right by what sticks out
  const label = cell.querySelector(".label");
  const thumb = cell.parentElement;
  label.style.transform = "";
  label.style.setProperty("--label-max", `${Math.max(60, thumb.clientWidth - 8)}px`);
  const t = thumb.getBoundingClientRect();
  const l = label.getBoundingClientRect();
  let dx = 0;
  if (l.right > t.right - 4) dx = t.right - 4 - l.right;
  if (l.left + dx < t.left + 4) dx = t.left + 4 - l.left;
  label.style.transform = `translateX(${dx}px)`;
}

function light(cell, on) {
  cell.classList.toggle("lit", on);
  if (on) fitLabel(cell);
}

function overlay(words) {
  // One .cell per grid cell some word matched best; one .mark per word in it (nested frames when words share
  // the cell, each in its own word's colour). Opacity follows the confidence (or the similarity, relative to
  // the best word of this result, where the API gives no confidence).
  const best = Math.max(1e-6, ...words.map((w) => w.similarity));
  const cells = new Map();
  for (const w of words) {
    const key = w.cell.join(",");
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(w);
  }
  return Array.from(cells.values(), (ws) => {
    const [rows, cols] = ws[0].grid;
    const [r, c] = ws[0].cell;
    const marks = ws.map((w, k) => el("div", {
      class: "mark", "data-i": String(w.i), "data-word": w.word,
      style: { "--hue": String(w.hue), "--k": String(k),
               "--alpha": String(typeof w.confidence === "number" ? 0.15 + 0.5 * w.confidence
                                                                  : 0.15 + 0.45 * Math.max(0, w.similarity / best)) },
    }));
    const label = el("div", { class: "label" }, ws.flatMap((w, k) => [
      ...(k ? [document.createTextNode(" · ")] : []),
      el("span", { style: { "--hue": String(w.hue) } }, [
        el("b", { text: w.word }),
        ...(typeof w.confidence === "number" ? [document.createTextNode(` ${percent(w.confidence)}`)] : []),
      ]),
    ]));
    const cell = el("div", {
      class: r >= rows / 2 ? "cell up" : "cell", "data-word": ws.map((w) => w.word).join(" "), "data-cell": `${r},${c}`,
      style: { left: `${(100 * c) / cols}%`, top: `${(100 * r) / rows}%`, width: `${100 / cols}%`, height: `${100 / rows}%` },
    }, [...marks, label]);
    cell.addEventListener("mouseenter", () => light(cell, true));
    cell.addEventListener("mouseleave", () => light(cell, false));
    return cell;
  });
}

function legend(words, thumb) {
  // the shown words under the photo, in their colours; hovering one lights up the cell it matched
  return el("div", { class: "legend" }, words.map((w) => {
    const chip = el("span", { class: "chip", "data-i": String(w.i), style: { "--hue": String(w.hue) }, title: wordNote(w) }, [
      el("span", { class: "w", text: w.word }),
      ...(typeof w.confidence === "number" ? [el("span", { class: "conf", text: percent(w.confidence) })] : []),
    ]);
    const cell = () => thumb.querySelector(`.mark[data-i="${w.i}"]`)?.parentElement;
    chip.addEventListener("mouseenter", () => { const c = cell(); if (c) light(c, true); });
    chip.addEventListener("mouseleave", () => { const c = cell(); if (c) light(c, false); });
    return chip;
  }));
}

// -- text -> images ----------------------------------------------------------------------------------------

// One list of image results at a time: a text search or a "more like this"; "load more" asks the same endpoint
// for the next page (the answer's next_offset) and appends it.
let listing = null; // { path, body, next } of the results shown

function folderFilter() {
  const folder = $("folder").value.trim().replace(/^\/+|\/+$/g, "");
  return folder ? { filter: { must: [{ key: "folder", prefix: folder }] } } : {};
}

function showMore(res) {
  listing.next = res.has_more ? res.next_offset : null;
  $("load-more").hidden = listing.next === null || listing.next === undefined;
}

async function loadMore() {
  if (!listing || listing.next === null) return;
  setStatus("text-status", "loading more…");
  try {
    const res = await call(listing.path, {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(Object.assign({}, listing.body, { offset: listing.next })),
    });
    const s = strength(res, textThreshold);
    $("image-results").append(...res.results.map((r, i) => imageCard(r, listing.path === "/search/text" && s.weak[i])));
    showMore(res);
    setStatus("text-status", `${$("image-results").children.length} of ${res.total} images`);
  } catch (err) {
    setStatus("text-status", err.message, true);
  }
}

async function moreLike(id) {
  setStatus("text-status", "finding similar photos…");
  const body = Object.assign({ id, k: searchParams().k }, folderFilter());
  try {
    const res = await call("/search/similar", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    releaseImages();
    listing = { path: "/search/similar", body };
    $("image-results").replaceChildren(...res.results.map((r) => imageCard(r, false)));
    $("image-results").classList.remove("explained");
    notice("text-notice", "info", "More like ", `${id} (by the whole photo's similarity).`);
    showMore(res);
    setStatus("text-status", `${res.results.length} of ${res.total} photos in ${res.timings_ms.total.toFixed(0)} ms`);
  } catch (err) {
    setStatus("text-status", err.message, true);
  }
}

function imageCard(r, weak) {
  const img = el("img", { alt: r.id, loading: "lazy" });
  showImage(img, r.uri);
  const words = groundedWords(r.grounding);
  const thumb = el("div", { class: "thumb" }, [img, ...overlay(words)]);
  const score = el("div", { class: "score", text: `#${r.rank} score ${r.score.toFixed(3)}` });
  if (weak) score.appendChild(el("span", { class: "badge", text: "weak match" }));
  return el("figure", { class: weak ? "card weak" : "card", "data-id": r.id, "data-rank": String(r.rank) }, [
    thumb,
    el("figcaption", { class: "meta" }, [
      score,
      el("div", { class: "parts", text: `global ${r.global_score.toFixed(3)} · local ${r.local_score.toFixed(3)}` }),
      el("div", { class: "id", text: r.id }),
      ...(words.length ? [legend(words, thumb)] : []),
      similarButton(r.id),
    ]),
  ]);
}

function similarButton(id) {
  const button = el("button", { type: "button", class: "link more-like", text: "more like this" });
  button.addEventListener("click", () => moreLike(id));
  return button;
}

async function searchText(showAll) {
  // showAll: ask for every result, also those below the API's match threshold (min_score -1)
  const query = $("query").value.trim();
  if (!query) return;
  const explain = $("explain").checked;
  setStatus("text-status", "searching…");
  try {
    const body = Object.assign({ query, explain }, searchParams(), folderFilter(), showAll ? { min_score: -1 } : {});
    const res = await call("/search/text", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    releaseImages();
    listing = { path: "/search/text", body };
    showMore(res);
    const s = strength(res, showAll ? textThreshold : null);
    if (typeof res.min_score === "number" && res.min_score > -1) textThreshold = res.min_score;
    $("image-results").replaceChildren(...res.results.map((r, i) => imageCard(r, s.weak[i])));
    $("image-results").classList.toggle("explained", explain);
    matchNotice("text-notice", "images", s, res.results.length > 0, showAll ? null : () => searchText(true));
    const t = res.timings_ms;
    setStatus("text-status", `${res.results.length} images in ${t.total.toFixed(0)} ms ` +
      `(encode ${t.encode.toFixed(0)}, first stage ${t.coarse.toFixed(1)}, rerank ${t.rerank.toFixed(1)})` +
      (res.truncated ? " · query truncated" : "") +
      (explain && res.results.length ? " · hover a box or a word to see what matched where" : ""));
  } catch (err) {
    notice("text-notice", "");
    setStatus("text-status", err.message, true);
  }
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchText(false);
});
$("load-more").addEventListener("click", loadMore);
$("explain").addEventListener("change", () => {
  if ($("query").value.trim()) searchText(false);
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
    const s = strength(res, null);
    $("caption-results").replaceChildren(...res.results.map((r, i) => {
      let mini;
      if (r.image_id) {
        mini = el("img", { class: "mini", alt: r.image_id, title: r.image_id, loading: "lazy" });
        showImage(mini, imageUri(r.image_id));
      } else {
        mini = el("span", { class: "mini none", title: "a caption without an image" });
      }
      const score = el("span", { class: "score", text: `score ${r.score.toFixed(3)}` });
      if (s.weak[i]) score.appendChild(el("span", { class: "badge", text: "weak" }));
      return el("li", { "data-id": r.id, class: s.weak[i] ? "weak" : "" }, [
        el("div", { class: "row" }, [el("span", { class: "rank", text: `${r.rank}.` }), mini,
                                     el("span", { class: "caption", text: r.caption }), score]),
      ]);
    }));
    matchNotice("image-notice", "captions", s, res.results.length > 0, null);
    setStatus("image-status", res.results.length
      ? `${res.results.length} captions in ${res.timings_ms.total.toFixed(0)} ms`
      : "no captions in this index");
  } catch (err) {
    notice("image-notice", "");
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
