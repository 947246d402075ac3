/* The clinic page: asks the service for the clinic's patients and §11 measure results (one
 * JSON call, computed by the service's population module), then renders one row per patient
 * (by name, the most overdue first, linked to the patient page, expandable to its items) and
 * one plain-SVG bar chart per measure
 * (all patients, per tier, per round), with a table holding the same figures, and per completion
 * measure a small chart of its score per quarter (also as a table). The organisation
 * and practitioner filters pick among results the service computed for each choice. */
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let smart = null;
  let view = null;

  const { setStatus, serviceUrl, problem } = window.FhirDm;
  const headers = () => window.FhirDm.headers(smart);

  /* A cell; `label` is its column's name, shown before the value when the table is stacked
   * on a narrow screen. */
  function cell(row, text, label, className) {
    const td = document.createElement("td");
    if (text instanceof Node) td.appendChild(text); else td.textContent = text;
    if (label) td.dataset.label = label;
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

  const pct = (score) => Math.round(score * 100) + "%";
  const tierLabel = (t) => view.labels.tiers[t] || t;
  const roundLabel = (r) => view.labels.rounds[r] || r;

  /* The filter's choices: each organisation or practitioner by name (the value is the
   * reference the results are keyed by), sorted by name. */
  function options(select, pairs) {
    const seen = new Map(pairs);
    for (const [value, name] of [...seen].sort((a, b) => a[1].localeCompare(b[1]))) {
      const o = document.createElement("option");
      o.value = value;
      o.textContent = name;
      select.appendChild(o);
    }
  }

  function chosen() {
    return { org: $("filter-organization").value || null, gp: $("filter-practitioner").value || null };
  }

  function patientLink(p) {
    const a = document.createElement("a");
    const id = p.patient.split("/").pop();
    a.href = "./?patient=" + encodeURIComponent(id);
    a.textContent = p.name || p.patient;
    a.className = "patient";
    return a;
  }

  function itemsTable(p) {
    const table = document.createElement("table");
    table.className = "stack";
    const caption = document.createElement("caption");
    caption.className = "sr-only";
    caption.textContent = "Tests of " + (p.name || p.patient);
    const head = document.createElement("thead");
    const hr = document.createElement("tr");
    for (const h of ["Status", "Round", "Test", "Due"]) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = h;
      hr.appendChild(th);
    }
    head.appendChild(hr);
    const body = document.createElement("tbody");
    for (const it of p.items) {
      const row = document.createElement("tr");
      row.dataset.status = it.status;
      cell(row, it.status + (it.consider ? " (consider)" : ""), "Status", "status status-" + it.status);
      cell(row, it.round, "Round");
      cell(row, it.test, "Test");
      cell(row, `${it.dueStart} to ${it.dueEnd}` + (it.doneOn ? `; done ${it.doneOn}` : ""), "Due", "due");
      body.appendChild(row);
    }
    table.append(caption, head, body);
    return table;
  }

  function renderPatients() {
    const { org, gp } = chosen();
    const patients = view.patients.filter((p) => (!org || p.organization === org) && (!gp || p.practitioner === gp));
    const tbody = $("patients").querySelector("tbody");
    tbody.replaceChildren();
    patients.forEach((p, i) => {
      const row = document.createElement("tr");
      row.className = "patient-row";
      row.dataset.patient = p.patient;
      const who = document.createElement("span");
      who.append(patientLink(p));
      if (p.practitionerName !== view.noValue) {
        const gpLine = document.createElement("span");
        gpLine.className = "who-line muted";
        gpLine.textContent = "Practitioner: " + p.practitionerName;
        who.append(gpLine);
      }
      cell(row, who, "Patient");
      cell(row, (p.tier ? tierLabel(p.tier) : "Not stratified") + (p.preliminary ? " (preliminary)" : ""), "Tier");
      const most = p.mostOverdue;
      cell(row, most ? `${most.test} (${most.round}), ${most.daysOverdue} days overdue` : "nothing overdue", "Most overdue", most ? "overdue" : "");
      const c = p.counts;
      cell(row, `${c.overdue} / ${c.due} / ${c.upcoming} / ${c.done}`, "Overdue / due / upcoming / done", "tally");
      cell(row, p.nextDue || "nothing owed", "Next due by", "date");
      cell(row, p.organizationName, "Organisation");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link toggle";
      button.textContent = `Show items (${p.items.length})`;
      button.setAttribute("aria-expanded", "false");
      const detailId = "items-" + i;
      button.setAttribute("aria-controls", detailId);
      cell(row, button, "Items");
      const detail = document.createElement("tr");
      detail.className = "items";
      detail.id = detailId;
      detail.hidden = true;
      const td = document.createElement("td");
      td.colSpan = 7;
      td.appendChild(itemsTable(p));
      detail.appendChild(td);
      button.addEventListener("click", () => {
        const open = detail.hidden;
        detail.hidden = !open;
        button.setAttribute("aria-expanded", String(open));
        button.textContent = `${open ? "Hide" : "Show"} items (${p.items.length})`;
      });
      tbody.append(row, detail);
    });
    $("patients-empty").hidden = patients.length > 0;
    const overdue = patients.filter((p) => p.mostOverdue).length;
    $("filter-summary").textContent = `${patients.length} patient(s), ${overdue} with an overdue item.`;
  }

  /* One horizontal bar per group: the measure's score as a share of the full width, and the
   * figures written beside it (so the value never depends on the bar's length or colour). */
  function chart(measure, result) {
    const bars = [{ label: "All patients", kind: "all", r: result }];
    for (const t of result.byTier) bars.push({ label: tierLabel(t.tier), kind: "tier", r: t });
    for (const r of result.byRound) bars.push({ label: roundLabel(r.round), kind: "round", r: r });
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.id = "caption-" + measure.id;
    caption.textContent = measure.title + (measure.improvement === "decrease" ? " (lower is better)" : "");
    figure.appendChild(caption);
    // Narrow screens get a narrower drawing, so that its text stays readable when scaled.
    const narrow = $("measures").clientWidth < 600;
    const width = narrow ? 360 : 800, left = narrow ? 96 : 170, barW = narrow ? 120 : 360, rowH = 24, top = 6;
    const height = top + bars.length * rowH + 6;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": caption.id + " desc-" + measure.id, id: "measure-" + measure.id, class: "measure-chart" }, figure);
    const r = result;
    svg("desc", { id: "desc-" + measure.id }, root,
      r.score === null ? "No patient in the denominator." : `${r.numerator} of ${r.denominator} (${pct(r.score)}); the table "Measure results" lists every group.`);
    bars.forEach((b, i) => {
      const y = top + i * rowH;
      svg("text", { x: 4, y: y + 15 }, root, b.label);
      svg("rect", { x: left, y: y + 3, width: barW, height: rowH - 8, class: "track" }, root);
      const score = b.r.score;
      if (score !== null) {
        const bar = svg("rect", { x: left, y: y + 3, width: Math.max(score > 0 ? 2 : 0, score * barW), height: rowH - 8, class: "bar measure-" + b.kind, "data-score": score }, root);
        svg("title", {}, bar, `${b.label}: ${b.r.numerator} of ${b.r.denominator} (${pct(score)})`);
      }
      svg("text", { x: left + barW + 8, y: y + 15 }, root,
        score === null ? (narrow ? "none due" : "no patient in the denominator") : `${pct(score)} (${b.r.numerator} of ${b.r.denominator})`);
    });
    return figure;
  }

  /* One vertical bar per quarter (oldest first), labelled with the period's end and the figures,
   * so the chart reads without colour; a quarter with nobody in the denominator has no bar. */
  function overTimeChart(measure, quarters) {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.id = "caption-time-" + measure.id;
    caption.textContent = measure.title + ", by quarter";
    figure.appendChild(caption);
    const narrow = $("over-time").clientWidth < 600;
    const colW = narrow ? 88 : 150, left = 4, top = 8, barH = 100, width = left + quarters.length * colW;
    const mid = colW / 2;
    const height = top + barH + 44;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": caption.id + " desc-time-" + measure.id, id: "over-time-" + measure.id, class: "over-time-chart" }, figure);
    const text = (q) => q.r.score === null ? "no patient in the denominator" : `${pct(q.r.score)} (${q.r.numerator} of ${q.r.denominator})`;
    const points = quarters.map((q) => ({ period: q.period, r: q.measures.find((m) => m.id === measure.id) }));
    svg("desc", { id: "desc-time-" + measure.id }, root,
      points.map((q) => `${q.period.start} to ${q.period.end}: ${text(q)}`).join("; ") + ".");
    points.forEach((q, i) => {
      const x = left + i * colW;
      svg("rect", { x: x + mid - 25, y: top, width: 50, height: barH, class: "track" }, root);
      if (q.r.score !== null) {
        const h = Math.max(q.r.score > 0 ? 2 : 0, q.r.score * barH);
        const bar = svg("rect", { x: x + mid - 25, y: top + barH - h, width: 50, height: h, class: "bar measure-all", "data-score": q.r.score }, root);
        svg("title", {}, bar, `${q.period.start} to ${q.period.end}: ${text(q)}`);
      }
      svg("text", { x: x + mid, y: top + barH + 16, "text-anchor": "middle" }, root, "to " + q.period.end);
      svg("text", { x: x + mid, y: top + barH + 34, "text-anchor": "middle" }, root,
        q.r.score === null ? "none due" : `${pct(q.r.score)} (${q.r.numerator}/${q.r.denominator})`);
    });
    return figure;
  }

  function renderOverTime(entry) {
    const box = $("over-time");
    box.replaceChildren();
    const tbody = $("over-time-table").querySelector("tbody");
    tbody.replaceChildren();
    if (!entry) return;
    for (const m of view.measures.filter((x) => x.kind === "completion")) {
      box.appendChild(overTimeChart(m, entry.overTime));
      for (const q of entry.overTime) {
        const r = q.measures.find((x) => x.id === m.id);
        const row = document.createElement("tr");
        cell(row, m.title, "Measure"); cell(row, `${q.period.start} to ${q.period.end}`, "Period");
        cell(row, String(r.numerator), "Numerator"); cell(row, String(r.denominator), "Denominator");
        cell(row, r.score === null ? "no patient in the denominator" : pct(r.score), "Result");
        tbody.appendChild(row);
      }
    }
  }

  function renderMeasures() {
    const { org, gp } = chosen();
    const entry = view.results.find((e) => e.organization === org && e.practitioner === gp);
    const box = $("measures");
    box.replaceChildren();
    const tbody = $("measure-table").querySelector("tbody");
    tbody.replaceChildren();
    renderOverTime(entry);
    if (!entry) {
      box.textContent = "No patient matches this filter.";
      return;
    }
    view.measures.forEach((m, i) => {
      const result = entry.measures[i];
      box.appendChild(chart(m, result));
      const groups = [["All patients", result]];
      for (const t of result.byTier) groups.push([tierLabel(t.tier), t]);
      for (const r of result.byRound) groups.push([roundLabel(r.round), r]);
      for (const [label, g] of groups) {
        const row = document.createElement("tr");
        cell(row, m.title, "Measure"); cell(row, label, "Group");
        cell(row, String(g.numerator), "Numerator"); cell(row, String(g.denominator), "Denominator");
        cell(row, g.score === null ? "no patient in the denominator" : pct(g.score), "Result");
        tbody.appendChild(row);
      }
    });
  }

  function renderAll() {
    renderPatients();
    renderMeasures();
  }

  function render() {
    $("scope").textContent = `${view.assessed} IIM patient(s) assessed as of ${view.today}` +
      (view.found !== view.assessed ? ` (${view.found} found)` : "") + "; nothing is written.";
    $("period").textContent = `Reporting period ${view.period.start} to ${view.period.end}; a completion measure counts the patients whose round closed in the period.`;
    $("truncated").hidden = !view.truncated;
    $("truncated").textContent = view.truncated ? "Not the whole clinic: " + view.truncated.message : "";
    $("failed").hidden = !view.failed.length;
    $("failed").textContent = view.failed.length ? `Could not be assessed: ${view.failed.map((x) => (x.name || x.patient) + " (" + x.error + ")").join(", ")}.` : "";
    options($("filter-organization"), view.patients.map((p) => [p.organization, p.organizationName]));
    options($("filter-practitioner"), view.patients.map((p) => [p.practitioner, p.practitionerName]));
    $("filter-organization").addEventListener("change", renderAll);
    $("filter-practitioner").addEventListener("change", renderAll);
    renderAll();
    $("view").hidden = false;
  }

  async function main() {
    try {
      try {
        smart = await FHIR.oauth2.ready();
      } catch (e) {
        smart = null; // no SMART session: an open service answers without a token
      }
      const response = await fetch(serviceUrl("app/api/clinic"), { method: "POST", headers: headers() });
      if (!response.ok) throw new Error(await problem(response));
      view = await response.json();
      render();
      setStatus("");
      document.body.dataset.loaded = "true";
    } catch (error) {
      setStatus("The clinic could not be shown: " + error.message, true);
    }
  }
  main();
})();
