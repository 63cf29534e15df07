// dyadlab review page: the video, a timeline per face, and the reviewer's corrections.
// Plain JS, no build step, no external resources. Talks to dyadlab/review/server.py:
// GET /api/session (render), POST /api/save (corrections -> the new session).
"use strict";

(() => {
  const SVGNS = "http://www.w3.org/2000/svg";
  // track layout (px): speech band, trace, smile band
  const SPEECH_H = 8, GAP = 4, TRACE_H = 110, SMILE_H = 24;
  const TRACE_Y = SPEECH_H + GAP, SMILE_Y = TRACE_Y + TRACE_H + GAP;
  const TRACK_H = SMILE_Y + SMILE_H + 2;

  const $ = (id) => document.getElementById(id);
  const video = $("video"), timeline = $("timeline"), axis = $("axis");
  const statusEl = $("status"), dirtyEl = $("dirty"), timeEl = $("time"), zoomEl = $("zoom");

  const S = {
    session: null,
    selected: null, // {faceId, key}
    activeFace: null, // face_id that N, J and K act on
    dirty: false,
    saving: false,
    view: { t0: 0, t1: 1 },
    newCount: 0,
    width: 0,
  };

  // -- helpers ------------------------------------------------------------------------------
  const el = (name, attrs, parent) => {
    const e = document.createElementNS(SVGNS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (parent) parent.appendChild(e);
    return e;
  };
  const h = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const fmt = (t) => (t == null || !Number.isFinite(t) ? "–" : t.toFixed(2));
  const duration = () => {
    const d = S.session && S.session.video && S.session.video.duration_s;
    if (Number.isFinite(d) && d > 0) return d;
    return Number.isFinite(video.duration) && video.duration > 0 ? video.duration : 1;
  };
  const fps = () => {
    const f = S.session && S.session.video && S.session.video.fps;
    return Number.isFinite(f) && f > 0 ? f : 30;
  };
  const faces = () => (S.session ? S.session.faces : []);
  const face = (faceId) => faces().find((f) => f.face_id === faceId);
  const xOf = (t) => ((t - S.view.t0) / (S.view.t1 - S.view.t0)) * S.width;
  const tOf = (x) => S.view.t0 + (x / S.width) * (S.view.t1 - S.view.t0);

  function setStatus(text, error) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", !!error);
  }
  function setDirty(d) {
    S.dirty = d;
    dirtyEl.hidden = !d;
    document.title = (d ? "● " : "") + "dyadlab review";
  }
  function reviewLine(review, justSaved) {
    if (!review) return "automatic codes, not reviewed yet";
    const by = `v${review.version} by ${review.reviewer}`;
    return justSaved ? `saved ${by}` : `last saved ${by}${review.saved_at ? " at " + review.saved_at : ""}`;
  }

  // -- the session ----------------------------------------------------------------------------
  function adopt(session) {
    // give every smile a stable key (data-smile-id); new ones get "new-N" until saved
    for (const f of session.faces) {
      for (const s of f.smiles) {
        s._key = s.smile_id != null ? String(s.smile_id) : `new-${++S.newCount}`;
      }
      f.smiles.sort((a, b) => a.start_s - b.start_s);
    }
    const first = S.session === null;
    S.session = session;
    $("title").textContent = session.title || "review";
    if (S.activeFace === null || !face(S.activeFace)) {
      S.activeFace = session.faces.length ? session.faces[0].face_id : null;
    }
    const d = duration(), span = Math.min(d, S.view.t1 - S.view.t0);
    S.view = first ? { t0: 0, t1: d } : { t0: Math.min(S.view.t0, d - span), t1: Math.min(S.view.t0, d - span) + span };
  }

  function findSmile(sel) {
    if (!sel) return null;
    const f = face(sel.faceId);
    return f ? f.smiles.find((s) => s._key === sel.key) || null : null;
  }

  // -- rendering ------------------------------------------------------------------------------
  function render() {
    if (!S.session) return;
    S.width = Math.max(200, timeline.clientWidth || 800);
    timeline.replaceChildren();
    for (const f of faces()) timeline.appendChild(renderTrack(f));
    renderAxis();
    renderDetails();
    updatePlayhead();
    const zoom = duration() / (S.view.t1 - S.view.t0);
    zoomEl.textContent = zoom > 1.01 ? `zoom ×${zoom.toFixed(1)}` : "";
  }

  function yScale(f) {
    const tr = f.trace || {};
    let lo = 0, hi = Number.isFinite(f.threshold) ? f.threshold * 1.4 : 1;
    for (const key of ["au12", "au06"]) {
      for (const v of tr[key] || []) {
        if (v == null || !Number.isFinite(v)) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    hi += (hi - lo) * 0.05;
    return (v) => TRACE_Y + TRACE_H - ((v - lo) / (hi - lo || 1)) * TRACE_H;
  }

  function visibleRange(ts) {
    // indices [i0, i1) of samples in the view, one sample of margin each side
    let i0 = 0, i1 = ts.length;
    while (i0 < ts.length && ts[i0] < S.view.t0) i0++;
    while (i1 > 0 && ts[i1 - 1] > S.view.t1) i1--;
    return [Math.max(0, i0 - 1), Math.min(ts.length, i1 + 1)];
  }

  function drawTrace(svg, f, key, cls, y) {
    const tr = f.trace || {};
    const ts = tr.t || [], vs = tr[key] || [];
    const [i0, i1] = visibleRange(ts);
    const step = Math.max(1, Math.floor((i1 - i0) / (2 * S.width)));
    let pts = [];
    const flush = () => {
      if (pts.length > 1) el("polyline", { class: cls, points: pts.join(" ") }, svg);
      pts = [];
    };
    for (let i = i0; i < i1; i += step) {
      const v = vs[i];
      if (v == null || !Number.isFinite(v)) { flush(); continue; }
      pts.push(`${xOf(ts[i]).toFixed(1)},${y(v).toFixed(1)}`);
    }
    flush();
  }

  function drawLowConfidence(svg, f) {
    const tr = f.trace || {};
    const ts = tr.t || [], au = tr.au12 || [], conf = tr.confidence || [];
    const minConf = Number.isFinite(f.min_confidence) ? f.min_confidence : 0;
    const dt = ts.length > 1 ? (ts[ts.length - 1] - ts[0]) / (ts.length - 1) : 1 / fps();
    let start = null;
    const bad = (i) => au[i] == null || !Number.isFinite(au[i]) || (conf[i] != null && conf[i] < minConf);
    const shade = (a, b) => {
      const x0 = Math.max(0, xOf(a)), x1 = Math.min(S.width, xOf(b));
      if (x1 > x0) el("rect", { class: "lowconf", x: x0, y: TRACE_Y, width: Math.max(1, x1 - x0), height: TRACE_H }, svg);
    };
    for (let i = 0; i < ts.length; i++) {
      if (bad(i)) { if (start === null) start = ts[i] - dt / 2; }
      else if (start !== null) { shade(start, ts[i] - dt / 2); start = null; }
    }
    if (start !== null) shade(start, ts[ts.length - 1] + dt / 2);
  }

  function drawSmile(svg, f, s) {
    const sel = S.selected && S.selected.faceId === f.face_id && S.selected.key === s._key;
    const classes = ["smile", `status-${s.status}`];
    if (sel) classes.push("selected");
    if (s._pending) classes.push("pending");
    const g = el("g", { class: classes.join(" "), "data-smile-id": s._key, "data-face-id": f.face_id }, svg);
    const x0 = xOf(s.start_s), x1 = xOf(s.end_s);
    el("title", {}, g).textContent =
      `${s.smile_id ?? "new"} · ${s.status} · ${fmt(s.start_s)}–${fmt(s.end_s)} s`;
    el("rect", { class: "span", x: x0, y: TRACE_Y, width: Math.max(1, x1 - x0), height: TRACE_H }, g);
    const clamp = (t) => Math.min(s.end_s, Math.max(s.start_s, Number.isFinite(t) ? t : s.start_s));
    const a = clamp(s.onset_end_s), b = Math.max(a, clamp(s.offset_start_s));
    for (const [cls, t0, t1] of [["onset", s.start_s, a], ["apex", a, b], ["offset", b, s.end_s]]) {
      el("rect", {
        class: `phase ${cls}`, x: xOf(t0), y: SMILE_Y, width: Math.max(1, xOf(t1) - xOf(t0)), height: SMILE_H,
      }, g);
    }
  }

  function renderTrack(f) {
    const section = h("section", undefined, "track");
    section.dataset.faceId = f.face_id;
    section.classList.toggle("active", f.face_id === S.activeFace);
    const label = h("div", f.label || `face ${f.face_id}`, "track-label");
    label.appendChild(h("span", ` · face ${f.face_id} · threshold ${f.threshold} · ${f.smiles.length} smiles`, "muted"));
    section.appendChild(label);
    const svg = el("svg", { viewBox: `0 0 ${S.width} ${TRACK_H}`, height: TRACK_H, "data-face-id": f.face_id });
    el("rect", { class: "bg", x: 0, y: 0, width: S.width, height: TRACK_H }, svg);
    for (const [a, b] of S.session.speech || []) {
      const x0 = Math.max(0, xOf(a)), x1 = Math.min(S.width, xOf(b));
      if (x1 > x0) el("rect", { class: "speech", x: x0, y: 0, width: Math.max(1, x1 - x0), height: SPEECH_H }, svg);
    }
    el("line", { class: "band-line", x1: 0, x2: S.width, y1: SMILE_Y - GAP / 2, y2: SMILE_Y - GAP / 2 }, svg);
    drawLowConfidence(svg, f);
    const y = yScale(f);
    if (Number.isFinite(f.threshold)) {
      el("line", { class: "threshold", x1: 0, x2: S.width, y1: y(f.threshold), y2: y(f.threshold) }, svg);
    }
    drawTrace(svg, f, "au06", "au06", y);
    drawTrace(svg, f, "au12", "au12", y);
    for (const s of f.smiles) {
      if (s.end_s >= S.view.t0 && s.start_s <= S.view.t1) drawSmile(svg, f, s);
    }
    el("line", { class: "playhead", x1: 0, x2: 0, y1: 0, y2: TRACK_H }, svg);
    svg.addEventListener("click", (e) => onTrackClick(e, f, svg));
    section.appendChild(svg);
    return section;
  }

  function renderAxis() {
    axis.replaceChildren();
    axis.setAttribute("viewBox", `0 0 ${S.width} 22`);
    const span = S.view.t1 - S.view.t0;
    const steps = [0.04, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
    const step = steps.find((s) => (s / span) * S.width >= 70) || 3600;
    for (let t = Math.ceil(S.view.t0 / step) * step; t <= S.view.t1 + 1e-9; t += step) {
      const x = xOf(t);
      el("line", { x1: x, x2: x, y1: 0, y2: 5 }, axis);
      const m = Math.floor(t / 60), sec = t - 60 * m;
      const label = m ? `${m}:${sec.toFixed(step < 1 ? 1 : 0).padStart(step < 1 ? 4 : 2, "0")}` : `${+t.toFixed(2)} s`;
      el("text", { x: Math.min(Math.max(x, 12), S.width - 12), y: 17, "text-anchor": "middle" }, axis).textContent = label;
    }
  }

  function renderDetails() {
    const box = $("details");
    box.replaceChildren();
    const s = findSmile(S.selected);
    if (!s) {
      box.appendChild(h("p", "No smile selected: click one, or J/K.", "muted"));
      return;
    }
    const f = face(S.selected.faceId);
    box.appendChild(h("h2", `${f.label || "face " + f.face_id}: smile ${s.smile_id ?? "(new)"} — ${s.status}`));
    const table = h("table");
    const row = (k, v) => {
      const tr = h("tr");
      tr.append(h("th", k), h("td", v));
      table.appendChild(tr);
    };
    row("start / end", `${fmt(s.start_s)} – ${fmt(s.end_s)} s`);
    row("onset / apex / offset", s._pending
      ? "recomputed on save"
      : `${fmt(s.start_s)}–${fmt(s.onset_end_s)} / ${fmt(s.onset_end_s)}–${fmt(s.offset_start_s)} / ${fmt(s.offset_start_s)}–${fmt(s.end_s)} s`);
    if (!s._pending) {
      for (const [k, v] of Object.entries(s.features || {})) {
        row(k.replaceAll("_", " "), typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v));
      }
    }
    box.appendChild(table);
  }

  function updatePlayhead() {
    const t = video.currentTime || 0;
    timeEl.textContent = `${t.toFixed(2)} s / ${duration().toFixed(2)} s`;
    const x = xOf(t).toFixed(1);
    for (const line of timeline.querySelectorAll(".playhead")) {
      line.setAttribute("x1", x);
      line.setAttribute("x2", x);
    }
  }

  function follow() {
    // keep the playhead in the (zoomed) view
    const t = video.currentTime || 0, span = S.view.t1 - S.view.t0;
    if (span < duration() - 1e-6 && (t < S.view.t0 || t > S.view.t1)) {
      const t0 = Math.min(Math.max(0, t - span * 0.1), duration() - span);
      S.view = { t0, t1: t0 + span };
      render();
    }
  }

  function frame() {
    if (S.session) {
      follow();
      updatePlayhead();
    }
    requestAnimationFrame(frame);
  }

  // -- actions --------------------------------------------------------------------------------
  function seek(t) {
    video.currentTime = Math.min(Math.max(0, t), duration());
    follow();
    updatePlayhead();
  }

  function select(faceId, key, doSeek) {
    S.selected = key == null ? null : { faceId, key };
    if (faceId != null) S.activeFace = faceId;
    const s = findSmile(S.selected);
    if (s && doSeek) seek(s.start_s);
    render();
  }

  function onTrackClick(e, f, svg) {
    const g = e.target.closest("[data-smile-id]");
    if (g) {
      select(f.face_id, g.getAttribute("data-smile-id"), true);
      return;
    }
    const box = svg.getBoundingClientRect();
    S.activeFace = f.face_id;
    seek(tOf(((e.clientX - box.left) / box.width) * S.width));
    render();
  }

  function step(sign) {
    video.pause();
    seek((video.currentTime || 0) + sign / fps());
  }

  function neighbour(dir) {
    const faceId = S.selected ? S.selected.faceId : S.activeFace;
    const f = face(faceId);
    if (!f || !f.smiles.length) return setStatus("no smiles on this track");
    const cur = findSmile(S.selected);
    let i;
    if (cur) {
      i = f.smiles.indexOf(cur) + dir;
    } else {
      const t = video.currentTime || 0;
      i = dir > 0 ? f.smiles.findIndex((s) => s.start_s > t + 1e-3) : f.smiles.findLastIndex((s) => s.start_s < t - 1e-3);
    }
    if (i < 0 || i >= f.smiles.length) return setStatus(dir > 0 ? "no next smile" : "no previous smile");
    select(faceId, f.smiles[i]._key, true);
  }

  function edited(s) {
    if (s.status === "auto" || s.status === "accepted") s.status = "edited";
    s._pending = true;
    setDirty(true);
    render();
  }

  function deleteSelected() {
    const s = findSmile(S.selected);
    if (!s) return setStatus("select a smile first (click, J or K)");
    const f = face(S.selected.faceId);
    f.smiles.splice(f.smiles.indexOf(s), 1);
    S.selected = null;
    setDirty(true);
    setStatus(`deleted smile ${s.smile_id ?? "(new)"} — S to save`);
    render();
  }

  function acceptSelected() {
    const s = findSmile(S.selected);
    if (!s) return setStatus("select a smile first (click, J or K)");
    if (s.status !== "auto") return setStatus(`smile already ${s.status}`);
    s.status = "accepted";
    setDirty(true);
    render();
  }

  function setBoundary(which) {
    const s = findSmile(S.selected);
    if (!s) return setStatus("select a smile first (click, J or K)");
    const t = video.currentTime || 0, minLen = 1 / fps();
    if (which === "start") {
      if (t > s.end_s - minLen) return setStatus("the start must be before the end", true);
      s.start_s = t;
    } else {
      if (t < s.start_s + minLen) return setStatus("the end must be after the start", true);
      s.end_s = t;
    }
    face(S.selected.faceId).smiles.sort((a, b) => a.start_s - b.start_s);
    setStatus(`${which} set to ${fmt(t)} s`);
    edited(s);
  }

  function newSmile() {
    const f = face(S.selected ? S.selected.faceId : S.activeFace);
    if (!f) return setStatus("no face track", true);
    const d = duration(), minLen = 2 / fps();
    let start = Math.min(video.currentTime || 0, d);
    const end = Math.min(start + 1, d);
    if (end - start < minLen) start = Math.max(0, end - 1);
    const third = (end - start) / 3;
    const s = {
      smile_id: null, start_s: start, end_s: end, onset_end_s: start + third, offset_start_s: end - third,
      status: "added", features: {}, _key: `new-${++S.newCount}`, _pending: true,
    };
    f.smiles.push(s);
    f.smiles.sort((a, b) => a.start_s - b.start_s);
    S.selected = { faceId: f.face_id, key: s._key };
    S.activeFace = f.face_id;
    setDirty(true);
    setStatus(`new smile ${fmt(start)}–${fmt(end)} s — [ / ] to adjust, S to save`);
    render();
  }

  function zoom(factor) {
    const d = duration();
    const span = factor === 0 ? d : Math.min(d, Math.max(10 / fps(), (S.view.t1 - S.view.t0) / factor));
    const t = video.currentTime || 0;
    const t0 = Math.min(Math.max(0, t - span / 2), d - span);
    S.view = { t0, t1: t0 + span };
    render();
  }

  function payload() {
    return {
      base_version: S.session.review ? S.session.review.version : 0,
      faces: faces().map((f) => ({
        face_id: f.face_id,
        smiles: f.smiles.map((s) => ({ smile_id: s.smile_id ?? null, start_s: s.start_s, end_s: s.end_s, status: s.status })),
      })),
    };
  }

  async function save() {
    if (!S.session || S.saving) return;
    S.saving = true;
    setStatus("saving…");
    const prev = findSmile(S.selected), prevFace = S.selected && S.selected.faceId;
    try {
      const r = await fetch("/api/save", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(payload()),
        credentials: "same-origin",
        cache: "no-store",
      });
      const body = await r.json().catch(() => null);
      if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
      adopt(body);
      setDirty(false);
      // keep the selection: same id, or (a new smile) the same start
      const f = face(prevFace);
      const again = prev && f && (f.smiles.find((s) => prev.smile_id != null && s.smile_id === prev.smile_id)
        || f.smiles.find((s) => Math.abs(s.start_s - prev.start_s) < 1e-6));
      S.selected = again ? { faceId: prevFace, key: again._key } : null;
      setStatus(reviewLine(body.review, true));
      render();
    } catch (err) {
      setStatus(`save failed: ${err.message}`, true);
    } finally {
      S.saving = false;
    }
  }

  // -- input ----------------------------------------------------------------------------------
  function onKey(e) {
    const t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    if (e.altKey || e.metaKey || e.ctrlKey || !S.session) return;
    const actions = {
      " ": () => (video.paused ? video.play().catch((err) => setStatus(`cannot play: ${err.message}`, true)) : video.pause()),
      ArrowLeft: () => step(-1),
      ArrowRight: () => step(1),
      j: () => neighbour(-1),
      k: () => neighbour(1),
      d: deleteSelected,
      a: acceptSelected,
      "[": () => setBoundary("start"),
      "]": () => setBoundary("end"),
      n: newSmile,
      s: save,
      "+": () => zoom(2),
      "=": () => zoom(2),
      "-": () => zoom(0.5),
      0: () => zoom(0),
      Escape: () => select(null, null, false),
    };
    const action = actions[e.key.length === 1 ? e.key.toLowerCase() : e.key];
    if (!action) return;
    e.preventDefault();
    e.stopPropagation();
    action();
  }

  document.addEventListener("keydown", onKey, true);
  window.addEventListener("beforeunload", (e) => {
    if (!S.dirty) return;
    e.preventDefault();
    e.returnValue = "";
  });
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(render, 100);
  });
  video.addEventListener("loadedmetadata", () => render());
  video.addEventListener("error", () => setStatus("the video cannot be played in this browser", true));

  async function load() {
    // the token has done its work (the cookie carries it now): keep it out of history
    if (location.search) history.replaceState(null, "", location.pathname);
    try {
      const r = await fetch("/api/session", { credentials: "same-origin", cache: "no-store" });
      const body = await r.json().catch(() => null);
      if (!r.ok) throw new Error((body && body.error) || `HTTP ${r.status}`);
      adopt(body);
      setDirty(false);
      setStatus(reviewLine(body.review, false));
      render();
      document.body.dataset.ready = "1";
    } catch (err) {
      setStatus(`cannot load the session: ${err.message}`, true);
    }
  }

  load();
  requestAnimationFrame(frame);
})();
