/* The patient page: reads the SMART context (fhirclient), asks the service for the patient's
 * assessment preview, and renders the tier, the reasons, a timeline chart (plain SVG) and the
 * tests by round; the write button calls the service's $dm-cancer-screening operation with the
 * clinician's token. Everything shown comes from the service's one JSON view. */
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const STATUSES = ["overdue", "due", "upcoming", "done"];
  const DAY = 86400000;
  const $ = (id) => document.getElementById(id);
  let smart = null;
  let patientId = null;

  const { setStatus, serviceUrl, problem } = window.FhirDm;
  const headers = () => window.FhirDm.headers(smart);

  function list(el, items) {
    el.replaceChildren();
    for (const text of items) {
      const li = document.createElement("li");
      li.textContent = text;
      el.appendChild(li);
    }
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function svg(name, attrs, parent, text) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    if (parent) parent.appendChild(el);
    return el;
  }

  const day = (iso) => Date.parse(iso + "T00:00:00Z");

  /* One row per round; in it one thin bar per test across its due window, coloured by status;
   * a red line for today and a dashed line for the diagnosis date. */
  function renderChart(view) {
    const schedule = view.explanation.schedule;
    const rounds = view.rounds;
    const box = $("chart");
    box.replaceChildren();
    if (!rounds.length) {
      box.textContent = "No tests are proposed.";
      return;
    }
    const dates = [day(view.today)];
    for (const r of rounds) dates.push(day(r.start), day(r.end));
    if (view.diagnosis.date) dates.push(day(view.diagnosis.date));
    const t0 = Math.min(...dates) - 30 * DAY;
    const t1 = Math.max(...dates) + 30 * DAY;
    const width = 960, left = 190, right = 20, top = 28, barH = 7, gap = 3;
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
    const heights = rounds.map((r) => {
      const n = schedule.filter((s) => s.round_label === r.label).length;
      return Math.max(26, n * (barH + gap) + 10);
    });
    const height = top + heights.reduce((a, b) => a + b, 0) + 24;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "chart-title chart-desc", id: "timeline" }, box);
    svg("title", { id: "chart-title" }, root, "Timeline of the screening plan");
    const c = view.counts;
    svg("desc", { id: "chart-desc" }, root,
      `${rounds.length} rounds; ${c.done} done, ${c.due} due, ${c.overdue} overdue, ${c.upcoming} upcoming; the table "Tests by round" lists them.`);
    // Axis: a tick every 6 months.
    const first = new Date(t0);
    let tick = Date.UTC(first.getUTCFullYear(), first.getUTCMonth() < 6 ? 6 : 12, 1);
    while (tick < t1) {
      const d = new Date(tick);
      svg("line", { x1: x(tick), x2: x(tick), y1: top - 6, y2: height - 20, class: "axis" }, root);
      svg("text", { x: x(tick), y: top - 10, "text-anchor": "middle" }, root,
        d.getUTCFullYear() + (d.getUTCMonth() === 6 ? "-07" : ""));
      tick = Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 6, 1);
    }
    let y = top;
    rounds.forEach((r, i) => {
      const items = schedule.filter((s) => s.round_label === r.label);
      const g = svg("g", { class: "round", "data-round": r.id }, root);
      svg("rect", { x: x(day(r.start)), y: y + 2, width: Math.max(2, x(day(r.end)) - x(day(r.start))), height: heights[i] - 4, class: "window" }, g);
      svg("text", { x: 4, y: y + 16 }, g, r.label);
      svg("text", { x: 4, y: y + 30, class: "muted" }, g,
        STATUSES.map((s) => [s, items.filter((it) => it.status === s).length]).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", "));
      items.forEach((it, k) => {
        const bar = svg("rect", {
          x: x(day(it.due_start)), y: y + 5 + k * (barH + gap),
          width: Math.max(3, x(day(it.due_end)) - x(day(it.due_start))), height: barH,
          class: "item " + it.status, "data-status": it.status,
        }, g);
        svg("title", {}, bar, `${it.test}: ${it.status}, due ${it.due_start} to ${it.due_end}`);
      });
      y += heights[i];
    });
    const marker = (t, cls, label, dy) => {
      svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: height - 18, class: cls }, root);
      svg("text", { x: x(t), y: height - 4 - dy, "text-anchor": "middle", class: cls + "-label" }, root, label);
    };
    if (view.diagnosis.date) marker(day(view.diagnosis.date), "diagnosis", "Diagnosis " + view.diagnosis.date, 0);
    marker(day(view.today), "today", "Today " + view.today, 14);
  }

  function render(view) {
    const e = view.explanation;
    $("tier").textContent = e.tier_label || "Not stratified";
    $("tier").dataset.tier = view.tier || "";
    $("preliminary").hidden = !view.preliminary;
    $("headline").textContent = e.headline;
    list($("counts"), []);
    for (const s of STATUSES) {
      const li = document.createElement("li");
      li.className = "status-" + s;
      li.dataset.status = s;
      const n = document.createElement("span");
      n.className = "count";
      n.textContent = String(view.counts[s]);
      li.append(n, " " + s);
      $("counts").appendChild(li);
    }
    const plan = view.plan;
    let summary;
    if (!plan.proposed) summary = "No plan is proposed for this patient.";
    else if (plan.status === "unchanged") summary = "This plan is on file in the record; nothing to write.";
    else if (plan.revision) summary = "A revision is pending: the plan on file differs from the record's current assessment. " + plan.summary;
    else summary = "No plan is on file yet. " + plan.summary;
    $("plan-summary").textContent = summary;
    const button = $("write");
    button.hidden = !plan.writable;
    button.disabled = false;
    button.textContent = plan.revision ? "Write the revised plan to the record" : "Write the proposed plan to the record";
    const tbody = $("factors").querySelector("tbody");
    tbody.replaceChildren();
    for (const f of view.factors) {
      const row = document.createElement("tr");
      cell(row, f.label); cell(row, f.kind.replace("factor-", "")); cell(row, f.evidence); cell(row, f.id);
      tbody.appendChild(row);
    }
    $("factors").hidden = !view.factors.length;
    list($("reasons"), e.reasons);
    list($("notices"), e.notices);
    $("notices-box").hidden = !e.notices.length;
    const items = $("items").querySelector("tbody");
    items.replaceChildren();
    const order = { overdue: 0, due: 1, upcoming: 2, done: 3 };
    const rows = [...e.schedule].sort((a, b) => order[a.status] - order[b.status]);
    for (const r of rows) {
      const row = document.createElement("tr");
      row.dataset.status = r.status;
      cell(row, r.status, "status status-" + r.status);
      cell(row, r.round_label);
      cell(row, r.test);
      cell(row, `${r.due_start} to ${r.due_end}`);
      cell(row, [r.consider ? (r.condition || "consider") : "", r.evidence ? "done: " + r.evidence : ""].filter(Boolean).join("; "));
      items.appendChild(row);
    }
    list($("unknown"), e.unknown_facts.length ? e.unknown_facts : ["Nothing: every fact the rules read is recorded."]);
    $("ruleset").textContent = e.ruleset;
    $("guideline").textContent = e.guideline;
    $("onset").textContent = e.onset;
    renderChart(view);
    $("view").hidden = false;
  }

  async function load() {
    const started = performance.now();
    const response = await fetch(serviceUrl(`app/api/Patient/${encodeURIComponent(patientId)}/view`), { method: "POST", headers: headers() });
    if (!response.ok) throw new Error(await problem(response));
    const view = await response.json();
    render(view);
    setStatus("");
    document.body.dataset.rendered = String(Math.round(performance.now() - started));
    // Milliseconds from the start of the page's navigation to the first complete render.
    if (!document.body.dataset.firstRender) document.body.dataset.firstRender = String(Math.round(performance.now()));
    document.body.dataset.loaded = "true";
  }

  async function write() {
    const button = $("write");
    button.disabled = true;
    $("write-result").textContent = "Writing…";
    try {
      const url = serviceUrl(`Patient/${encodeURIComponent(patientId)}/$dm-cancer-screening`);
      url.searchParams.set("preview", "false");
      const response = await fetch(url, { method: "POST", headers: headers() });
      if (!response.ok) throw new Error(await problem(response));
      const body = await response.json();
      const outcome = body.entry[0].resource.issue[0].diagnostics;
      await load();
      $("write-result").textContent = "Written: " + outcome;
    } catch (error) {
      $("write-result").textContent = "Not written: " + error.message;
      button.disabled = false;
    }
  }

  async function main() {
    try {
      smart = await FHIR.oauth2.ready();
      // A patient chosen on the clinic page (`?patient=`), else the launch's patient.
      patientId = new URLSearchParams(window.location.search).get("patient") || smart.patient.id;
      if (!patientId) throw new Error("the launch gave no patient in context");
      $("patient").textContent = "Patient/" + patientId;
      smart.request("Patient/" + encodeURIComponent(patientId)).then((p) => {
        const name = (p.name || [])[0];
        if (name) $("patient").textContent = [...(name.given || []), name.family || ""].join(" ").trim() + " (Patient/" + patientId + ")";
      }).catch(() => {});
      $("write").addEventListener("click", write);
      await load();
    } catch (error) {
      setStatus("The assessment could not be shown: " + error.message, true);
    }
  }
  main();
})();
