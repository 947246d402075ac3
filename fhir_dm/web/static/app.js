/* The patient page: reads the SMART context (fhirclient), asks the service for the patient's
 * assessment preview, and renders who the patient is, the tier and what each factor
 * contributed, the reasons (the rules and sources behind them in a collapsible section), a
 * timeline (Chart.js, vendored) and the tests by round; the write button calls the service's
 * $dm-cancer-screening operation with the clinician's token. Everything shown comes from the
 * service's one JSON view. */
"use strict";
(function () {
  const STATUSES = ["overdue", "due", "upcoming", "done"];
  // Every status an item can have, in the order the timeline's legend lists them.
  const ALL_STATUSES = ["overdue", "due", "upcoming", "done", "done-late", "missed"];
  const STATUS_LABEL = { overdue: "Overdue", due: "Due", upcoming: "Upcoming", done: "Done", "done-late": "Done late", missed: "Missed" };
  const DAY = 86400000;
  const $ = (id) => document.getElementById(id);
  let smart = null;
  let patientId = null;
  let chart = null;

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

  /* A cell; `label` is its column's name, shown before the value when the table is stacked
   * on a narrow screen. */
  function cell(row, text, label, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (label) td.dataset.label = label;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  const day = (iso) => Date.parse(iso + "T00:00:00Z");
  const iso = (t) => new Date(t).toISOString().slice(0, 10);
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const shorten = (text, max) => (text.length > max ? text.slice(0, max - 1).trimEnd() + "…" : text);

  /* Month starts between t0 and t1, every `step` months: the axis's ticks, so that they fall on
   * readable dates and never crowd (Chart.js skips any that would still overlap). */
  function monthTicks(t0, t1, step) {
    const first = new Date(t0);
    let y = first.getUTCFullYear(), m = Math.ceil((first.getUTCMonth() + 1) / step) * step;
    const out = [];
    for (;;) {
      const t = Date.UTC(y + Math.floor(m / 12), m % 12, 1);
      if (t > t1) return out;
      if (t >= t0) out.push({ value: t });
      m += step;
    }
  }

  /* Vertical lines with a label above the plot (today, the diagnosis date); a label near the
   * right edge is drawn to the line's left so it is never cut off. */
  const markers = {
    id: "markers",
    afterDatasetsDraw(c, args, options) {
      const { ctx, chartArea: area, scales } = c;
      for (const m of options.lines || []) {
        const px = scales.x.getPixelForValue(m.t);
        ctx.save();
        ctx.strokeStyle = m.color;
        ctx.lineWidth = 2;
        ctx.setLineDash(m.dash || []);
        ctx.beginPath();
        ctx.moveTo(px, area.top - 4 - m.row * 16);
        ctx.lineTo(px, area.bottom);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = m.color;
        ctx.font = "600 13px system-ui, sans-serif";
        ctx.textBaseline = "bottom";
        const w = ctx.measureText(m.label).width;
        const x = px + 4 + w > c.width - 2 ? px - 4 - w : px + 4;
        ctx.fillText(m.label, Math.max(2, x), area.top - 4 - m.row * 16);
        ctx.restore();
      }
    },
  };

  /* One row per test (in the order first due), one horizontal bar per round's due window,
   * coloured by status (the legend and the table say the status in words); a line for today
   * and a dashed one for the diagnosis date. */
  function renderChart(view) {
    const schedule = view.explanation.schedule;
    const box = $("chart");
    if (chart) { chart.destroy(); chart = null; }
    if (!schedule.length) {
      box.hidden = true;
      $("chart-note").textContent = "No tests are proposed.";
      return;
    }
    box.hidden = false;
    const sorted = [...schedule].sort((a, b) => a.due_start.localeCompare(b.due_start));
    const tests = [...new Set(sorted.map((r) => r.test))];
    const dates = [day(view.today)];
    for (const r of schedule) dates.push(day(r.due_start), day(r.due_end));
    if (view.diagnosis.date) dates.push(day(view.diagnosis.date));
    const span = Math.max(...dates) - Math.min(...dates);
    const t0 = Math.min(...dates) - Math.max(30 * DAY, span * 0.03);
    const t1 = Math.max(...dates) + Math.max(30 * DAY, span * 0.03);
    const years = (t1 - t0) / (365 * DAY);
    const narrow = box.clientWidth < 600;
    const step = years <= 1.2 ? (narrow ? 4 : 2) : years <= 3.5 ? (narrow ? 12 : 6) : 12;
    // Row labels get at most 40% of the width (about 7 px a character), whole names at most 56.
    const labelChars = Math.max(12, Math.min(56, Math.floor((box.clientWidth * 0.4) / 7)));
    const tickLabel = (v) => (narrow && step === 12 ? iso(v).slice(0, 4) : iso(v).slice(0, 7));
    const colour = {
      overdue: css("--overdue"), due: css("--due"), upcoming: css("--upcoming"),
      done: css("--done"), "done-late": css("--done"), missed: css("--missed"),
    };
    const datasets = ALL_STATUSES.map((status) => ({
      label: STATUS_LABEL[status],
      status,
      data: schedule.filter((r) => r.status === status).map((r) => ({ x: [day(r.due_start), day(r.due_end) + DAY], y: r.test, row: r })),
      backgroundColor: colour[status],
      borderColor: colour[status],
      borderWidth: 0,
      grouped: false,
      barPercentage: 0.8,
      categoryPercentage: 0.9,
      minBarLength: 3,
    })).filter((d) => d.data.length);
    box.style.height = `${tests.length * 26 + 110}px`;
    const c = view.counts;
    $("timeline").setAttribute("aria-label",
      `Timeline of the screening plan: ${tests.length} tests, ${c.done} done, ${c.due} due, ${c.overdue} overdue, ${c.upcoming} upcoming; the table "Tests by round" lists them.`);
    const lines = [{ t: day(view.today), label: "Today " + view.today, color: css("--today"), row: 0 }];
    if (view.diagnosis.date) {
      lines.push({ t: day(view.diagnosis.date), label: "Diagnosis " + view.diagnosis.date, color: css("--fg"), dash: [5, 3], row: 1 });
    }
    chart = new window.Chart($("timeline"), {
      type: "bar",
      data: { labels: tests, datasets },
      plugins: [markers],
      options: {
        indexAxis: "y",
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        layout: { padding: { top: 38, right: 8 } },
        font: { family: "system-ui, sans-serif" },
        scales: {
          x: {
            type: "linear",
            position: "bottom",
            min: t0,
            max: t1,
            afterBuildTicks: (axis) => { axis.ticks = monthTicks(t0, t1, step); },
            ticks: { callback: tickLabel, maxRotation: 0, autoSkip: true, autoSkipPadding: 12, color: css("--fg"), font: { size: 12 } },
            grid: { color: css("--line") },
          },
          y: {
            ticks: {
              autoSkip: false,
              color: css("--fg"),
              font: { size: narrow ? 12 : 13 },
              callback(value) { return shorten(this.getLabelForValue(value), labelChars); },
            },
            grid: { display: false },
          },
        },
        plugins: {
          markers: { lines },
          legend: { position: "bottom", labels: { color: css("--fg"), boxWidth: 14, font: { size: 13 } } },
          tooltip: {
            callbacks: {
              title: (items) => items[0].raw.row.test,
              label: (item) => {
                const r = item.raw.row;
                return `${r.round_label}: ${STATUS_LABEL[r.status] || r.status}${r.consider ? " (consider)" : ""}, due ${r.due_start} to ${r.due_end}`;
              },
            },
          },
        },
      },
    });
  }

  function renderHeader(view) {
    const h = view.header;
    $("patient").textContent = h.name || "Name not recorded";
    $("who-age").textContent = h.age ? h.age + " years" : "not recorded";
    $("who-sex").textContent = h.sex + (h.sexNote ? ` (${h.sexNote})` : "");
    $("who-mrn").textContent = h.mrn || "not recorded";
    $("who-diagnosis").textContent = h.diagnosis ? `${h.diagnosis.date} (from ${h.diagnosis.source})` : "not recorded";
    $("who").hidden = false;
    const from = h.condition ? ` of ${h.condition}` : "";
    $("onset-line").textContent = (h.onset
      ? `Symptom onset ${h.onset.date} (from ${h.onset.source}${from}), used for eligibility and the age at onset.`
      : "Symptom onset not recorded.") + (h.diagnosis ? ` Diagnosis date read from ${h.diagnosis.source}${from}.` : "") + ` ${view.patient}.`;
  }

  function render(view) {
    const e = view.explanation;
    renderHeader(view);
    $("tier").textContent = view.tierLabel || "Not stratified";
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
    $("items-line").textContent = view.items.line + (view.items.total ? "; a service request is an order placed now, a care-plan activity is later, to consider, done or an examination." : "");
    const plan = view.plan;
    const size = view.items.line.replace(/^Proposed: /, "");
    let summary;
    if (!plan.proposed) summary = "No plan is proposed for this patient.";
    else if (plan.status === "unchanged") summary = "This plan is on file in the record; nothing to write.";
    // In the clinician's words: what writing would do (the service's one-line summary, with its
    // Patient reference, is for integration engines and logs).
    else if (plan.revision) summary = "The plan on file differs from what the record now gives: writing revises it in place (" + size + ").";
    else summary = "No plan is on file yet: writing records the care plan and its orders (" + size + ").";
    $("plan-summary").textContent = summary;
    const button = $("write");
    button.hidden = !plan.writable;
    button.disabled = false;
    button.textContent = plan.revision ? "Write the revised plan to the record" : "Write the proposed plan to the record";
    $("tier-basis").textContent = view.tierBasis || "";
    $("tier-basis").hidden = !view.tierBasis;
    const tbody = $("factors").querySelector("tbody");
    tbody.replaceChildren();
    for (const f of view.factors) {
      const row = document.createElement("tr");
      row.dataset.factor = f.id;
      cell(row, f.factor, "Factor");
      cell(row, f.contribution, "Counts as", "contribution contribution-" + f.class);
      tbody.appendChild(row);
    }
    $("factors").hidden = !view.factors.length;
    list($("reasons"), e.reasons);
    list($("notices"), e.notices);
    $("notices-box").hidden = !e.notices.length;
    list($("evidence"), e.evidence.length ? e.evidence : ["No rule applied."]);
    const items = $("items").querySelector("tbody");
    items.replaceChildren();
    const order = { overdue: 0, due: 1, upcoming: 2, done: 3, "done-late": 3, missed: 4 };
    const rows = [...e.schedule].sort((a, b) => order[a.status] - order[b.status]);
    for (const r of rows) {
      const row = document.createElement("tr");
      row.dataset.status = r.status;
      cell(row, r.status, "Status", "status status-" + r.status);
      cell(row, r.round_label, "Round");
      cell(row, r.test, "Test");
      cell(row, `${r.due_start} to ${r.due_end}`, "Due", "due");
      cell(row, r.order ? "service request" : "care-plan activity", "Kind");
      cell(row, [r.consider ? (r.condition || "consider") : "", r.note, r.evidence ? "done: " + r.evidence : ""].filter(Boolean).join("; "), "Note");
      items.appendChild(row);
    }
    list($("unknown"), e.unknown_facts.length ? e.unknown_facts : ["Nothing: every fact the rules read is recorded."]);
    $("ruleset").textContent = e.ruleset;
    $("guideline").textContent = e.guideline;
    $("view").hidden = false;
    renderChart(view);
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
      $("write").addEventListener("click", write);
      await load();
    } catch (error) {
      setStatus("The assessment could not be shown: " + error.message, true);
    }
  }
  main();
})();
