// The explorer page: reads its state from the URL, asks the explorer's JSON endpoints (each one
// call of the public gRPC API) and draws the answers. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);

// Test and tuning hooks: when the first list was drawn, and how many answers were drawn.
window.explorer = { firstRenderMs: null, renders: 0 };

// URL parameter names are the JSON endpoints' names: a page link is the call it makes.
const FIELDS = ["k", "min_year", "max_year", "min_rating", "pool", "max_per_genre"];
const STAGES = [
  ["history_ms", "history"], ["user_tower_ms", "user tower"], ["retrieval_ms", "retrieval"],
  ["ranking_ms", "ranking"], ["reranking_ms", "MMR + rules"],
];

const state = {
  mode: "user",
  history: [],          // [{movie_id, rating}] in order, oldest first
  movies: new Map(),    // movie_id -> {title, genres, year}, for the history table
  genres: new Set(),
  catalog: null,
  similar: null,        // movie id of the "similar to" panel
  seq: { recs: 0, similar: 0, popular: 0 },
};

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

const fmtMs = (ms) => (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2));

async function getJSON(path, params) {
  const url = params ? `${path}?${params}` : path;
  const resp = await fetch(url, { headers: { Accept: "application/json" } });
  let body;
  try {
    body = await resp.json();
  } catch (e) {
    body = { error: { code: `HTTP ${resp.status}`, message: "the explorer answered something that is not JSON", source: "explorer" } };
  }
  if (!resp.ok || body.error) {
    const err = new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
    err.info = body.error || { code: `HTTP ${resp.status}`, message: err.message };
    throw err;
  }
  return body;
}

function showError(box, err) {
  const info = err.info || { code: "NETWORK", message: `${err.message} (is recsys explore still running?)`, source: "explorer" };
  box.replaceChildren(
    el("strong", { text: info.code }), " ",
    el("span", { class: "message", text: info.message }),
    info.request_id ? el("span", { class: "rid", text: ` request ${info.request_id}` }) : null,
    info.source === "explorer" ? el("span", { class: "muted", text: " (from the explorer, not the API)" }) : null,
  );
  box.hidden = false;
}

function movieCell(m) {
  const year = m.year ? ` (${m.year})` : "";
  return el("div", { class: "movie" },
    el("div", { class: "title" }, el("span", { text: m.title || `movie ${m.movie_id}` }), el("span", { class: "year", text: year })),
    el("div", { class: "genres" }, (m.genres || []).map((g) => el("span", { class: "genre", text: g }))),
  );
}

function similarButton(m) {
  return el("button", {
    type: "button", class: "link", title: "movies similar to this one", "data-similar": m.movie_id,
    onclick: () => { state.similar = m.movie_id; state.movies.set(m.movie_id, m); syncUrl(); askSimilar(); },
  }, "similar \u2192");
}

function metaLine(box, parts) {
  box.replaceChildren(...parts.filter(Boolean).map(([label, value, cls]) =>
    el("span", { class: `kv ${cls || ""}` }, el("span", { class: "k", text: label }), " ", el("span", { class: "v", text: value }))));
}

// ------------------------------------------------------------------ controls <-> URL

function params() {
  const p = new URLSearchParams();
  if (state.mode === "user") {
    if ($("user").value.trim()) p.set("user", $("user").value.trim());
  } else if (state.history.length) {
    p.set("history", state.history.map((h) => h.movie_id).join(","));
    if (state.history.some((h) => h.rating > 0)) p.set("ratings", state.history.map((h) => h.rating).join(","));
  }
  for (const f of FIELDS) if ($(f).value.trim() !== "") p.set(f, $(f).value.trim());
  const genres = state.catalog ? [...state.genres] : $("genre-text").value.split(",").map((g) => g.trim()).filter(Boolean);
  if (genres.length) p.set("genre", genres.join(","));
  if ($("include_seen").checked) p.set("include_seen", "1");
  if (!$("mmr_default").checked) p.set("mmr_lambda", $("mmr_lambda").value);
  if (Number($("freshness").value) > 0) p.set("freshness", $("freshness").value);
  return p;
}

function pageParams() {
  const p = params();
  if (state.mode === "history" && !state.history.length) p.set("mode", "history");
  if (state.similar !== null) p.set("similar", state.similar);
  if ($("sim_k").value !== "6") p.set("sim_k", $("sim_k").value);
  if ($("pop_genre").value) p.set("pop_genre", $("pop_genre").value);
  if ($("pop_window").value !== "all") p.set("pop_window", $("pop_window").value);
  if ($("pop_k").value !== "6") p.set("pop_k", $("pop_k").value);
  return p;
}

function syncUrl() {
  const q = pageParams().toString();
  history.replaceState(null, "", q ? `/?${q}` : "/");
}

function readUrl() {
  const p = new URLSearchParams(location.search);
  if (p.has("history") || p.get("mode") === "history") {
    state.mode = "history";
    const ids = (p.get("history") || "").split(",").filter((x) => x.trim() !== "");
    const ratings = (p.get("ratings") || "").split(",");
    state.history = ids.map((id, i) => ({ movie_id: Number(id), rating: Number(ratings[i]) || 0 }));
  }
  $("user").value = p.get("user") || "";
  for (const f of FIELDS) if (p.has(f)) $(f).value = p.get(f);
  const genres = (p.get("genre") || "").split(",").map((g) => g.trim()).filter(Boolean);
  state.genres = new Set(genres);
  $("genre-text").value = genres.join(",");
  $("include_seen").checked = p.get("include_seen") === "1";
  if (p.has("mmr_lambda")) { $("mmr_default").checked = false; $("mmr_lambda").value = p.get("mmr_lambda"); }
  if (p.has("freshness")) $("freshness").value = p.get("freshness");
  if (p.has("similar")) state.similar = Number(p.get("similar"));
  if (p.has("sim_k")) $("sim_k").value = p.get("sim_k");
  if (p.has("pop_k")) $("pop_k").value = p.get("pop_k");
  if (p.has("pop_window")) $("pop_window").value = p.get("pop_window");
  state.popGenre = p.get("pop_genre") || "";
}

function drawControls() {
  document.body.dataset.mode = state.mode;
  $("tab-user").classList.toggle("active", state.mode === "user");
  $("tab-history").classList.toggle("active", state.mode === "history");
  $("mmr_lambda").disabled = $("mmr_default").checked;
  $("mmr_lambda-out").textContent = $("mmr_default").checked ? "server default" : Number($("mmr_lambda").value).toFixed(2);
  const fresh = Number($("freshness").value);
  $("freshness-out").textContent = fresh > 0 ? fresh.toFixed(2) : "off";
  for (const chip of $("genre-chips").children) chip.classList.toggle("on", state.genres.has(chip.dataset.genre));
}

// ------------------------------------------------------------------ recommendations

async function askRecommend() {
  drawControls();
  syncUrl();
  drawHistory(null);
  const p = params();
  const panel = $("recs-panel");
  if (!p.has("user") && !p.has("history")) {
    panel.dataset.state = "idle";
    $("recs").tBodies[0].replaceChildren();
    $("recs-empty").hidden = false;
    $("recs-error").hidden = true;
    return;
  }
  const seq = ++state.seq.recs;
  panel.dataset.state = "loading";
  try {
    const answer = await getJSON("/api/recommend", p);
    if (seq !== state.seq.recs) return; // a newer question was asked meanwhile
    drawRecommend(answer);
    panel.dataset.state = "ready";
  } catch (err) {
    if (seq !== state.seq.recs) return;
    // no stale list under the message: it would read as the answer to the new question
    for (const id of ["recs-badges", "recs-meta", "recs-timings"]) $(id).replaceChildren();
    $("recs").tBodies[0].replaceChildren();
    $("recs-empty").hidden = true;
    showError($("recs-error"), err);
    panel.dataset.state = "error";
  }
  markRendered();
}

function markRendered() {
  window.explorer.renders += 1;
  if (window.explorer.firstRenderMs === null) window.explorer.firstRenderMs = performance.now();
}

function drawRecommend(a) {
  $("recs-error").hidden = true;
  $("recs-empty").hidden = a.items.length > 0;
  $("recs-empty").textContent = "No movie passes these filters.";
  const badges = [
    a.is_fallback
      ? el("span", { class: "badge warn", title: "the popular movies instead of the model's answer", text: `fallback: ${a.fallback_reason.replace("FALLBACK_REASON_", "").toLowerCase().replaceAll("_", " ")}` })
      : el("span", { class: "badge ok", text: "two-stage model" }),
    el("span", { class: "badge", text: `model ${a.model_version}` }),
    el("span", { class: "badge", title: "A/B arm", text: a.variant ? `A/B arm: ${a.variant}` : "no A/B experiment" }),
  ];
  $("recs-badges").replaceChildren(...badges);
  metaLine($("recs-meta"), [
    ["request", a.request_id || "none", "rid"],
    ["server", `${fmtMs(a.latency_ms)} ms`],
    ["round trip", `${fmtMs(a.round_trip_ms)} ms`],
    ["history read", `${a.history_length} movies`],
    a.ignored_movie_ids.length ? ["ignored ids", a.ignored_movie_ids.join(", "), "warn"] : null,
  ]);
  drawTimings(a);
  const rows = a.items.map((m, i) => el("tr", { "data-movie-id": m.movie_id },
    el("td", { class: "rank", text: String(i + 1) }),
    el("td", {}, movieCell(m)),
    el("td", { class: "num", text: m.score.toFixed(3) }),
    el("td", { class: "why", text: m.explanation }),
    el("td", { class: "act" }, similarButton(m)),
  ));
  $("recs").tBodies[0].replaceChildren(...rows);
  drawHistory(a);
}

function drawTimings(a) {
  const total = STAGES.reduce((s, [key]) => s + a.timings[key], 0);
  if (total <= 0) { $("recs-timings").replaceChildren(); return; }
  const bar = el("div", { class: "bar" }, STAGES.map(([key, label], i) => el("span", {
    class: `seg s${i}`, style: `flex-grow:${Math.max(a.timings[key], total * 0.004)}`, title: `${label}: ${fmtMs(a.timings[key])} ms`,
  })));
  const legend = el("div", { class: "legend" }, STAGES.map(([key, label], i) =>
    el("span", { "data-stage": key }, el("i", { class: `s${i}` }), `${label} ${fmtMs(a.timings[key])} ms`)));
  $("recs-timings").replaceChildren(bar, legend);
}

// ------------------------------------------------------------------ history

function drawHistory(answer) {
  const body = $("history-body");
  if (state.mode === "user") {
    const n = answer ? answer.history_length : null;
    $("history-summary").textContent = n === null ? "" : `${n} movies read by the model`;
    body.replaceChildren(el("p", { class: "note" },
      "The API does not return a stored user's history (no RPC exposes it), so the page cannot list it. ",
      "Switch to ", el("button", { type: "button", class: "link", onclick: () => setMode("history"), text: "Typed history" }),
      " to try a history of your own."));
    return;
  }
  if (answer && answer.history) for (const h of answer.history) if (h.known) state.movies.set(h.movie_id, h);
  $("history-summary").textContent = state.history.length ? `${state.history.length} movies, oldest first` : "";
  if (!state.history.length) {
    body.replaceChildren(el("p", { class: "note", text: "Search a title on the left and pick it to add it to the history." }));
    return;
  }
  const ratingSelect = (h) => {
    const select = el("select", { "aria-label": "rating", onchange: (e) => { h.rating = Number(e.target.value); askRecommend(); } },
      el("option", { value: "0", text: "watched" }),
      [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5].map((r) => el("option", { value: String(r), text: `${"\u2605".repeat(Math.floor(r))}${r % 1 ? "\u00bd" : ""} ${r}` })));
    select.value = String(h.rating);
    return select;
  };
  const rows = state.history.map((h, i) => {
    const m = state.movies.get(h.movie_id) || { movie_id: h.movie_id, title: "", genres: [], year: 0 };
    return el("tr", { "data-movie-id": h.movie_id },
      el("td", { class: "rank", text: String(i + 1) }),
      el("td", {}, movieCell(m)),
      el("td", {}, ratingSelect(h)),
      el("td", { class: "act" }, similarButton(m),
        el("button", { type: "button", class: "link danger", title: "remove from the history", text: "remove",
          onclick: () => { state.history.splice(i, 1); askRecommend(); } })),
    );
  });
  body.replaceChildren(el("table", { class: "list", id: "history" },
    el("thead", {}, el("tr", {}, el("th", { text: "#" }), el("th", { text: "Movie" }), el("th", { text: "Rating" }), el("th"))),
    el("tbody", {}, rows)));
}

function setMode(mode) {
  state.mode = mode;
  askRecommend();
}

function addToHistory(movie) {
  if (movie.title) state.movies.set(movie.movie_id, movie);
  state.history.push({ movie_id: movie.movie_id, rating: 0 });
  $("movie-search").value = "";
  $("suggestions").hidden = true;
  askRecommend();
}

const searchTitles = debounce(async () => {
  const q = $("movie-search").value.trim();
  const list = $("suggestions");
  if (!q || !state.catalog) { list.hidden = true; return; }
  try {
    const { movies } = await getJSON("/api/movies", new URLSearchParams({ q, limit: "10" }));
    list.replaceChildren(...movies.map((m) => el("li", { "data-movie-id": m.movie_id, onmousedown: (e) => { e.preventDefault(); addToHistory(m); } },
      el("span", { class: "title", text: m.title }), el("span", { class: "year", text: m.year ? ` ${m.year}` : "" }),
      el("span", { class: "muted", text: ` ${m.genres.join(", ")}` }))));
    if (!movies.length) list.replaceChildren(el("li", { class: "muted", text: "no title matches" }));
    list.hidden = false;
  } catch (err) {
    list.replaceChildren(el("li", { class: "error-line", text: err.message }));
    list.hidden = false;
  }
}, 120);

function onSearchKey(e) {
  if (e.key !== "Enter") return;
  const first = $("suggestions").querySelector("li[data-movie-id]");
  const typed = $("movie-search").value.trim();
  if (!$("suggestions").hidden && first) addToHistory({ movie_id: Number(first.dataset.movieId) });
  else if (/^\d+$/.test(typed)) addToHistory({ movie_id: Number(typed) }); // an id: the API says if it is unknown
}

// ------------------------------------------------------------------ similar and popular

// note(m): the grey line under a movie; Similar's explanations only repeat the panel's title
function drawCompact(list, items, note) {
  list.replaceChildren(...items.map((m) => el("li", { "data-movie-id": m.movie_id },
    movieCell(m),
    el("div", { class: "sub" }, el("span", { class: "muted", text: note(m) }), similarButton(m)))));
}

async function askSimilar() {
  if (state.similar === null) return;
  const panel = $("similar-panel");
  const seq = ++state.seq.similar;
  panel.dataset.state = "loading";
  const p = new URLSearchParams({ movie: state.similar, k: $("sim_k").value });
  const known = state.movies.get(state.similar);
  $("similar-title").textContent = known && known.title ? known.title : `movie ${state.similar}`;
  try {
    const a = await getJSON("/api/similar", p);
    if (seq !== state.seq.similar) return;
    if (a.movie.title) $("similar-title").textContent = a.movie.title;
    $("similar-error").hidden = true;
    $("similar-empty").hidden = true;
    metaLine($("similar-meta"), [["request", a.request_id || "none", "rid"], ["model", a.model_version], ["server", `${fmtMs(a.latency_ms)} ms`]]);
    drawCompact($("similar"), a.items, (m) => `cosine ${m.score.toFixed(3)}`);
    panel.dataset.state = "ready";
  } catch (err) {
    if (seq !== state.seq.similar) return;
    $("similar").replaceChildren();
    showError($("similar-error"), err);
    panel.dataset.state = "error";
  }
}

async function askPopular() {
  const panel = $("popular-panel");
  const seq = ++state.seq.popular;
  panel.dataset.state = "loading";
  const p = new URLSearchParams({ k: $("pop_k").value, window: $("pop_window").value });
  if ($("pop_genre").value) p.set("genre", $("pop_genre").value);
  syncUrl();
  try {
    const a = await getJSON("/api/popular", p);
    if (seq !== state.seq.popular) return;
    $("popular-error").hidden = true;
    metaLine($("popular-meta"), [["request", a.request_id || "none", "rid"], ["server", `${fmtMs(a.latency_ms)} ms`]]);
    drawCompact($("popular"), a.items, (m) => m.explanation);
    panel.dataset.state = "ready";
  } catch (err) {
    if (seq !== state.seq.popular) return;
    $("popular").replaceChildren();
    showError($("popular-error"), err);
    panel.dataset.state = "error";
  }
}

// ------------------------------------------------------------------ start

async function loadInfo() {
  try {
    const info = await getJSON("/api/info");
    $("target").textContent = info.target;
    const serving = info.health === "SERVING";
    $("health").textContent = serving ? "serving" : info.health;
    $("health-dot").className = `dot ${serving ? "ok" : "bad"}`;
    state.catalog = info.catalog;
    if (info.catalog) {
      $("catalog-info").textContent = `${info.catalog.movies.toLocaleString()} movies, ${info.catalog.genres.length} genres`;
      $("catalog-info").title = info.catalog.source;
      $("genre-chips").replaceChildren(...info.catalog.genres.map((g) => el("button", {
        type: "button", class: "chip", "data-genre": g, text: g,
        onclick: () => { state.genres.has(g) ? state.genres.delete(g) : state.genres.add(g); askRecommend(); },
      })));
      for (const g of info.catalog.genres) $("pop_genre").append(el("option", { value: g, text: g }));
      $("pop_genre").value = state.popGenre;
      $("search-hint").textContent = "Type part of a title; Enter or a click adds the movie.";
    } else {
      $("catalog-info").textContent = "no item table: title search off";
      $("genre-chips").hidden = true;
      $("genre-text").hidden = false;
      $("movie-search").placeholder = "type a movie id, then Enter";
      $("search-hint").textContent = "Start recsys explore with --artifacts DIR to search titles.";
      if (state.popGenre) $("pop_genre").append(el("option", { value: state.popGenre, text: state.popGenre }));
      $("pop_genre").value = state.popGenre;
    }
    drawControls();
  } catch (err) {
    $("health").textContent = `explorer unreachable: ${err.message}`;
    $("health-dot").className = "dot bad";
  }
}

function wire() {
  const again = debounce(askRecommend, 250);
  $("tab-user").addEventListener("click", () => setMode("user"));
  $("tab-history").addEventListener("click", () => setMode("history"));
  for (const id of ["user", ...FIELDS, "genre-text"]) $(id).addEventListener("input", again);
  for (const id of ["include_seen", "mmr_default"]) $(id).addEventListener("change", () => { drawControls(); askRecommend(); });
  for (const id of ["mmr_lambda", "freshness"]) $(id).addEventListener("input", () => { drawControls(); again(); });
  $("reset").addEventListener("click", () => {
    for (const f of FIELDS) $(f).value = f === "k" ? "10" : "";
    state.genres.clear();
    $("genre-text").value = "";
    $("include_seen").checked = false;
    $("mmr_default").checked = true;
    $("freshness").value = "0";
    askRecommend();
  });
  $("movie-search").addEventListener("input", searchTitles);
  $("movie-search").addEventListener("keydown", onSearchKey);
  $("movie-search").addEventListener("blur", () => setTimeout(() => { $("suggestions").hidden = true; }, 150));
  $("sim_k").addEventListener("input", debounce(() => { syncUrl(); askSimilar(); }, 250));
  for (const id of ["pop_genre", "pop_window"]) $(id).addEventListener("change", askPopular);
  $("pop_k").addEventListener("input", debounce(askPopular, 250));
}

document.addEventListener("DOMContentLoaded", () => {
  readUrl();
  wire();
  drawControls();
  // the recommendations first: the page's first render must not wait for the header's facts
  askRecommend();
  loadInfo().then(() => { askPopular(); askSimilar(); });
});
