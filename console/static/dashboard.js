// overnight monitoring dashboard: fetches /dashboard/api/overview and draws every panel with ECharts.
// Each panel's data-state becomes "ready" (drawn), "empty" (nothing recorded yet) or "error".
"use strict";

const REFRESH_SECONDS = 30;
const COLORS = { ok: "#2e9e5b", warn: "#d49a00", fail: "#d1433f", running: "#d49a00", success: "#2e9e5b",
                 failed: "#d1433f", blocked: "#d1433f", abandoned: "#8a5cc2", retrying: "#e0a030" };
const charts = {};

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function setState(panel, state, message) {
  const section = $(panel);
  section.dataset.state = state;
  const old = section.querySelector(".empty");
  if (old) old.remove();
  if (message) section.append(el("div", { class: "empty" }, message));
}

function chart(id) {
  if (!charts[id]) charts[id] = echarts.init($(id), null, { renderer: "canvas" });
  return charts[id];
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

function pct(value) { return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%"; }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return seconds.toFixed(1) + " s";
  if (seconds < 5400) return (seconds / 60).toFixed(1) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function bytes(value) {
  if (!value) return "–";
  return (value / 2 ** 20).toFixed(0) + " MiB";
}

function card(label, value, level) {
  return el("div", { class: "card " + (level || "") }, el("div", { class: "label" }, label),
            el("div", { class: "value" }, value));
}

function table(id, header, rows) {
  const node = $(id);
  node.replaceChildren(el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const row of rows) body.append(el("tr", {}, ...row));
  node.append(body);
}

function td(text, cls) { return el("td", cls ? { class: cls } : {}, text); }

// ------------------------------------------------------------------ panels

function drawLive(data) {
  const live = data.live;
  const cards = [];
  if (live) {
    const ageHours = live.age_seconds / 3600;
    cards.push(card("live batch", "#" + live.batch_id + " · " + live.logical_date));
    cards.push(card("model", live.model_id));
    cards.push(card("data age", ageHours.toFixed(1) + " h", ageHours > 26 ? "fail" : "ok"));
    cards.push(card("coverage", pct(live.coverage) + " of " + live.active_users.toLocaleString() + " users",
                    live.coverage < 0.95 ? "warn" : "ok"));
  } else {
    cards.push(card("live batch", "nothing published yet", "warn"));
  }
  const canary = data.canary;
  if (canary) {
    cards.push(card("canary", "#" + canary.batch_id + " · " + canary.logical_date + " · " + pct(canary.traffic) +
                    " of users · " + canary.model_id));
  }
  const last = data.runs.length ? data.runs[data.runs.length - 1] : null;
  if (last) {
    const accepted = last.accepted ? " · checks accepted" : "";
    cards.push(card("last run", last.logical_date + " · " + last.status + accepted,
                    last.status !== "success" ? "fail" : last.accepted ? "warn" : "ok"));
  }
  const levels = data.checks.filter((c) => c.logical_date === data.focus_date).map((c) => c.level);
  const verdict = levels.includes("fail") ? "fail" : levels.includes("warn") ? "warn" : "ok";
  if (data.focus_date) cards.push(card("monitoring " + data.focus_date, verdict, verdict));
  cards.push(card("retraining", data.retrain_reason ? "due: drift" : "not requested", data.retrain_reason ? "warn" : "ok"));
  $("live-cards").replaceChildren(...cards);
  if (data.retrain_reason) $("live-cards").append(el("div", { class: "muted" }, data.retrain_reason));
  setState("panel-live", "ready");
}

function drawRuns(data) {
  const runs = data.runs;
  if (!runs.length) { setState("panel-runs", "empty", "No run recorded yet."); return; }
  const steps = [];
  for (const run of runs) for (const s of run.steps) if (!steps.includes(s.step)) steps.push(s.step);
  const labels = runs.map((r) => "#" + r.run_id + " " + r.logical_date);
  chart("chart-runs").setOption({
    tooltip: { trigger: "axis", axisPointer: { type: "shadow" },
               valueFormatter: (v) => (v === null || v === undefined ? "–" : duration(v)) },
    legend: { top: 0, type: "scroll" },
    grid: { left: 50, right: 20, top: 35, bottom: 45 },
    xAxis: { type: "category", data: labels,
             axisLabel: { interval: 0, fontSize: 10,
                          formatter: (value, index) => value.split(" ").map((part) => "{" + runs[index].status + "|" + part + "}").join("\n"),
                          rich: Object.fromEntries(Object.entries(COLORS).map(([k, c]) => [k, { color: c, fontSize: 10, lineHeight: 13 }])) } },
    yAxis: { type: "value", name: "seconds" },
    series: steps.map((name) => ({
      name, type: "bar", stack: "steps",
      data: runs.map((run) => {
        const s = run.steps.find((x) => x.step === name);
        if (!s) return null;
        return { value: s.seconds, itemStyle: s.status === "success" ? {} : { borderColor: COLORS[s.status], borderWidth: 2 } };
      }),
    })),
  }, true);
  table("table-runs", ["run", "date", "trigger", "outcome", "duration", "rows in → out (ingest)", "users published", "peak memory", "error or note"],
    [...runs].reverse().map((run) => {
      const ingest = run.steps.find((s) => s.step === "ingest");
      const publish = run.steps.find((s) => s.step === "publish");
      const peak = Math.max(0, ...run.steps.map((s) => s.peak_memory_bytes || 0));
      const outcome = td(run.status + (run.accepted ? " (checks accepted)" : ""), "status " + run.status);
      if (run.status === "abandoned") outcome.style.color = COLORS.abandoned;
      return [td("#" + run.run_id), td(run.logical_date), td(run.trigger), outcome,
              td(duration(run.seconds)),
              td(ingest ? fmt(ingest.rows_in) + " → " + fmt(ingest.rows_out) : "–"),
              td(publish ? fmt(publish.rows_out) : "–"), td(bytes(peak)), td(runNote(run), "message")];
    }));
  setState("panel-runs", "ready");
}

// What the runs table says beside a run: its error, that its process died, or the checks accepted to publish.
function runNote(run) {
  const notes = [];
  if (run.error) notes.push(run.error);
  if (run.status === "abandoned") {
    const step = run.steps.find((s) => s.status === "abandoned");
    notes.push("abandoned" + (step ? " in " + step.step : "") + ": the process recording it died (" +
               (run.abandoned_at ? "noticed " + new Date(run.abandoned_at).toLocaleString()
                                 : "not yet recorded by the batch side") + ")");
  }
  const accepted = run.accepted;
  if (accepted) {
    const names = [...new Set(accepted.checks.map((c) => c.subject ? c.statistic + " of " + c.subject : c.statistic))];
    notes.push("batch #" + accepted.batch_id + " published with failing checks accepted (" + names.join(", ") + ") by " +
               accepted.accepted_by + " on " + new Date(accepted.accepted_at).toLocaleString() + ": “" + accepted.reason + "”");
  }
  return notes.join(" · ");
}

function drawModels(data) {
  const models = data.models.filter((m) => m.metrics["ndcg@10"] !== undefined);
  if (!models.length) { setState("panel-models", "empty", "No trained model yet."); return; }
  const baselines = [...new Set(models.flatMap((m) => Object.keys(m.baselines)))];
  const x = models.map((m) => m.logical_date);
  chart("chart-models").setOption({
    tooltip: { trigger: "axis", valueFormatter: (v) => fmt(v, 4) },
    legend: { top: 0 },
    grid: { left: 50, right: 20, top: 35, bottom: 30 },
    xAxis: { type: "category", data: x },
    yAxis: { type: "value", name: "NDCG@10", scale: true },
    series: [
      { name: "ranker", type: "line", data: models.map((m) => m.metrics["ndcg@10"]), symbolSize: 8, lineStyle: { width: 3 } },
      ...baselines.map((b) => ({ name: b.replace("_", " "), type: "line", lineStyle: { type: "dashed" },
                                data: models.map((m) => (m.baselines[b] || {})["ndcg@10"] ?? null) })),
    ],
  }, true);
  setState("panel-models", "ready");
}

// Each served model's online numbers per day (recorded nightly), beside its held-out NDCG@10.
function drawOnline(data) {
  const rows = data.online;
  if (!rows.length) {
    $("table-online").replaceChildren();
    setState("panel-online", "empty",
             "No online numbers yet: each night records the day before from the prediction log and feedback.");
    return;
  }
  const interval = (m) => (m && m.value !== null && m.value !== undefined
    ? pct(m.value) + (m.low !== null && m.low !== undefined ? " [" + pct(m.low) + ", " + pct(m.high) + "]" : "")
    : "–");
  table("table-online", ["day", "model", "status", "held-out NDCG@10", "impressions", "clicks", "CTR [95%]",
                         "conversion [95%]", "IPS click rate [95%]"],
    rows.map((r) => [td(r.day + (r.complete ? "" : " (partial)")), td(r.model_id), td(r.status || "–"),
                     td(fmt(r.ndcg, 4)), td(fmt(r.summary.impressions)), td(fmt(r.summary.clicks)),
                     td(interval(r.summary.ctr)), td(interval(r.summary.conversion_rate)),
                     td(interval(r.summary.ips_click_rate))]));
  setState("panel-online", "ready");
}

function drawChecks(data) {
  $("checks-date").textContent = data.focus_date ? "on " + data.focus_date : "";
  const problems = data.focus_checks;
  const alerts = data.alerts || [];
  if (!data.focus_date) { setState("panel-checks", "empty", "Nothing measured yet."); return; }
  const rows = problems.map((c) => [td(c.level, "level " + c.level), td(c.stage), td(c.message, "message")]);
  if (!rows.length) rows.push([td("ok", "level ok"), td("all"), td("every check within its thresholds", "message")]);
  for (const a of alerts.slice(0, 5)) {
    rows.push([td("alert", "level warn"), td(a.last_seen_at.slice(0, 16).replace("T", " ")),
               td(a.title + (a.times_seen > 1 ? " (seen " + a.times_seen + "×, sent once)" : ""), "message")]);
  }
  table("table-checks", ["level", "stage", "what"], rows);
  setState("panel-checks", "ready");
}

function series(data, stage, statistics) {
  const dates = [...new Set(data.checks.map((c) => c.logical_date))].sort();
  return {
    dates,
    lines: statistics.map((name) => ({
      name, type: "line", connectNulls: true, symbolSize: 6,
      data: dates.map((d) => {
        const c = data.checks.find((x) => x.logical_date === d && x.stage === stage && x.statistic === name && x.subject === "");
        return c && c.value !== null ? { value: c.value, itemStyle: { color: c.level === "ok" ? undefined : COLORS[c.level] } } : null;
      }),
    })).filter((line) => line.data.some((v) => v !== null)),
  };
}

function drawLines(panel, id, data, stage, statistics) {
  const found = series(data, stage, statistics);
  if (!found.lines.length) { setState(panel, "empty", "Not measured yet."); return; }
  chart(id).setOption({
    tooltip: { trigger: "axis", valueFormatter: (v) => fmt(v) },
    legend: { top: 0, type: "scroll" },
    grid: { left: 50, right: 20, top: 35, bottom: 30 },
    xAxis: { type: "category", data: found.dates },
    yAxis: { type: "value" },
    series: found.lines,
  }, true);
  setState(panel, "ready");
}

function drawDrift(data) {
  const cells = data.checks.filter((c) => c.stage === "drift" && c.statistic === "feature_psi" && c.value !== null);
  if (!cells.length) { setState("panel-drift", "empty", "No feature drift measured yet."); return; }
  const dates = [...new Set(cells.map((c) => c.logical_date))].sort();
  const features = [...new Set(cells.map((c) => c.subject))].sort();
  const warn = cells[0].warn_at ?? 0.2;
  const fail = cells[0].fail_at ?? Math.max(warn * 2, 0.25);
  chart("chart-drift").setOption({
    tooltip: { formatter: (p) => features[p.value[1]] + " on " + dates[p.value[0]] + ": PSI " + fmt(p.value[2]) },
    grid: { left: 150, right: 90, top: 10, bottom: 40 },
    xAxis: { type: "category", data: dates, splitArea: { show: true } },
    yAxis: { type: "category", data: features, splitArea: { show: true }, axisLabel: { fontSize: 11 } },
    visualMap: { type: "piecewise", orient: "vertical", right: 0, top: "middle", dimension: 2,
                 pieces: [{ lt: warn / 2, label: "< " + fmt(warn / 2), color: "#e8f5ec" },
                          { gte: warn / 2, lt: warn, label: "< " + fmt(warn), color: "#b7e1c4" },
                          { gte: warn, lt: fail, label: "≥ " + fmt(warn) + " warn", color: COLORS.warn },
                          { gte: fail, label: "≥ " + fmt(fail), color: COLORS.fail }] },
    series: [{ type: "heatmap", label: { show: dates.length <= 14, fontSize: 9, formatter: (p) => fmt(p.value[2], 2) },
               data: cells.map((c) => [dates.indexOf(c.logical_date), features.indexOf(c.subject), c.value]) }],
  }, true);
  setState("panel-drift", "ready");
}

function drawScores(data) {
  const output = data.output;
  const hist = output && output.report.score_histogram;
  if (!hist || !hist.counts.length) { setState("panel-scores", "empty", "No batch measured yet."); return; }
  $("scores-batch").textContent = "batch #" + output.batch_id + " · " + output.logical_date;
  const labels = hist.counts.map((_, i) => fmt((hist.edges[i] + hist.edges[i + 1]) / 2));
  const r = output.report;
  chart("chart-scores").setOption({
    title: { text: "lists " + fmt(r.lists) + " · distinct items " + fmt(r.distinct_items) + " · coverage " + pct(r.catalogue_coverage) +
                   " · Gini " + fmt(r.gini_exposure) + " · fallback " + pct(r.fallback_share) +
                   " · overlap with yesterday " + pct(r.overlap_yesterday),
             textStyle: { fontSize: 11, fontWeight: "normal" }, top: 0 },
    tooltip: { trigger: "axis" },
    grid: { left: 50, right: 20, top: 30, bottom: 30 },
    xAxis: { type: "category", data: labels, name: "score" },
    yAxis: { type: "value", name: "items" },
    series: [{ type: "bar", data: hist.counts, barCategoryGap: "5%" }],
  }, true);
  setState("panel-scores", "ready");
}

function drawService(data) {
  const s = data.service;
  if (!s || !s.available) {
    setState("panel-service", "empty", "The lookup service's metrics cannot be read" + (s && s.reason ? ": " + s.reason : "."));
    return;
  }
  $("service-cards").replaceChildren(
    card("/v1 requests", fmt(s.api_requests)),
    card("p50 / p99", (s.p50_ms === null ? "–" : fmt(s.p50_ms, 2)) + " / " + (s.p99_ms === null ? "–" : fmt(s.p99_ms, 2)) + " ms"),
    card("5xx errors", fmt(s.api_errors) + " (" + pct(s.error_share) + ")", s.error_share > 0.01 ? "fail" : "ok"),
    card("fallback answers", pct(s.fallback_share)),
  );
  const points = s.series;
  chart("chart-service").setOption({
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    grid: { left: 50, right: 50, top: 30, bottom: 25 },
    xAxis: { type: "category", data: points.map((p) => p.at.slice(11, 19)) },
    yAxis: [{ type: "value", name: "req/s" }, { type: "value", name: "ms" }],
    series: [
      { name: "requests/s", type: "line", data: points.map((p) => p.requests_per_second) },
      { name: "p99 ms", type: "line", yAxisIndex: 1, data: points.map((p) => p.p99_ms) },
    ],
  }, true);
  setState("panel-service", "ready");
}

// ------------------------------------------------------------------ loading

const PANELS = [
  ["panel-live", drawLive], ["panel-runs", drawRuns], ["panel-models", drawModels], ["panel-checks", drawChecks],
  ["panel-online", drawOnline],
  ["panel-drift", drawDrift],
  ["panel-input", (d) => drawLines("panel-input", "chart-input", d, "input",
    ["volume_change", "new_user_share", "new_item_share", "null_fraction", "quarantine_fraction", "weight_psi",
     "feedback_dropped_share"])],
  ["panel-output", (d) => drawLines("panel-output", "chart-output", d, "output",
    ["fallback_share", "catalogue_coverage", "gini_exposure", "short_list_share", "overlap_yesterday", "score_psi"])],
  ["panel-scores", drawScores], ["panel-service", drawService],
];

async function refresh() {
  const params = new URLSearchParams(window.location.search);
  const query = params.get("date") ? "?date=" + encodeURIComponent(params.get("date")) : "";
  let data;
  try {
    const response = await fetch("/dashboard/api/overview" + query, { credentials: "same-origin" });
    if (response.status === 401) { window.location.assign("/dashboard"); return; }
    data = await response.json();
    if (!response.ok) throw new Error(data.detail || response.statusText);
  } catch (error) {
    $("problem").hidden = false;
    $("problem").textContent = "Could not load the dashboard data: " + error.message;
    for (const [panel] of PANELS) if ($(panel).dataset.state === "loading") setState(panel, "error");
    return;
  }
  $("problem").hidden = true;
  for (const [panel, draw] of PANELS) {
    try { draw(data); } catch (error) { console.warn(panel, error); setState(panel, "error", "Could not draw: " + error.message); }
  }
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " · refreshes every " + REFRESH_SECONDS + " s";
  document.body.dataset.loaded = "true";
}

window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));
refresh();
setInterval(refresh, REFRESH_SECONDS * 1000);
