"""The page `GET /` serves: upload a query image, see its top-k gallery images with their labels and
scores. Everything it shows goes in as text (never as HTML), and its Content-Security-Policy allows only
its own inline script and style (by hash), images from the service or the picked file, and requests to
the service itself."""
from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
header p { color: #555; margin-top: 0; }
form { display: flex; gap: .8rem; align-items: center; flex-wrap: wrap; margin-bottom: 1rem; }
#status { min-height: 1.4em; }
#status.error { color: #b00020; }
.row { display: flex; gap: 1.5rem; align-items: flex-start; }
#query img { max-width: 200px; max-height: 200px; border: 3px solid #1565c0; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .8rem; flex: 1; }
.hit { border: 1px solid #ccc; padding: .4rem; font-size: .85rem; overflow-wrap: anywhere; }
.hit img { width: 100%; height: 150px; object-fit: contain; background: #f4f4f4; }
.hit .label { font-weight: 600; }
"""

SCRIPT = """
const form = document.getElementById("search");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const query = document.getElementById("query");
let maxUpload = null;

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function cell(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

fetch("/healthz").then((r) => r.json()).then((health) => {
  maxUpload = health.limits.max_upload_bytes;
  document.getElementById("k").max = health.limits.max_k;
  document.getElementById("k").value = health.limits.default_k;
  document.getElementById("about").textContent =
    `${health.model.arch}, ${health.model.embedding_dim}-d embeddings; index of ${health.index.count} ` +
    `images (${health.index.factory}, ${health.index.metric})`;
}).catch(() => say("the service does not answer /healthz", true));

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = document.getElementById("image").files[0];
  const k = document.getElementById("k").value;
  if (!file) { say("choose an image first", true); return; }
  if (maxUpload !== null && file.size > maxUpload) {
    say(`${file.name} is ${file.size} bytes, over the limit of ${maxUpload}`, true);
    return;
  }
  query.replaceChildren(cell("div", "", "query"));
  const preview = cell("img");
  preview.alt = file.name;
  preview.src = URL.createObjectURL(file);
  query.appendChild(preview);
  results.replaceChildren();
  say("searching...", false);
  let answer;
  try {
    const response = await fetch(`/search?k=${encodeURIComponent(k)}`, {
      method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
    answer = await response.json();
    if (!response.ok) { say(`error ${response.status}: ${answer.error}`, true); return; }
  } catch (error) {
    say(`the request failed: ${error}`, true);
    return;
  }
  for (const hit of answer.results) {
    const card = cell("figure", "hit");
    const image = cell("img");
    image.src = hit.url;
    image.alt = hit.path;
    card.appendChild(image);
    const caption = cell("figcaption");
    caption.appendChild(cell("div", "label", `#${hit.rank}  label ${hit.label === null ? "-" : hit.label}`));
    caption.appendChild(cell("div", "score", `score ${hit.score.toFixed(4)}`));
    caption.appendChild(cell("div", "path", hit.path));
    card.appendChild(caption);
    results.appendChild(card);
  }
  say(`top ${answer.results.length} of the index (${answer.metric}); embedded in a batch of ${answer.batch_size}`,
      false);
});
"""

HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>unidml search</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>unidml search</h1><p id="about"></p></header>
<form id="search" action="/search" method="post" enctype="multipart/form-data">
  <label>query image <input id="image" name="image" type="file" accept="image/*" required></label>
  <label>top k <input id="k" name="k" type="number" min="1" value="10"></label>
  <button type="submit">Search</button>
</form>
<div id="status"></div>
<div class="row"><div id="query"></div><div id="results"></div></div>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_digest(SCRIPT)}; style-src {_digest(STYLE)}; "
                           "img-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                           "frame-ancestors 'none'")
