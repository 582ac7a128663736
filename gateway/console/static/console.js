// Tollgate console charts: uPlot over the JSON the server computed and downsampled (no inline script: the
// page's Content-Security-Policy allows scripts from /console/static only). Charts redraw when htmx
// refreshes the balance cards, so the burn-down follows the ledger without a page reload.
(function () {
  "use strict";
  var PALETTE = ["#0b57d0", "#0f6a2e", "#8e44ad", "#b35900", "#00796b", "#c2185b", "#5d4037", "#455a64"];
  var charts = {};

  function color(i, alpha) {
    var hex = PALETTE[i % PALETTE.length];
    if (!alpha) return hex;
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  function formatCredits(v) { return v == null ? "" : Math.round(v).toLocaleString("en-US"); }

  function dateText(seconds) { return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC"; }

  function verticalLines(lines) {
    return function (u) {
      var ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
      ctx.save();
      lines.forEach(function (line) {
        var x = Math.round(u.valToPos(line.t, "x", true));
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        ctx.strokeStyle = line.color;
        ctx.lineWidth = line.width || 1.5;
        ctx.setLineDash(line.dash || []);
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      });
      ctx.restore();
    };
  }

  function burndownOptions(el, data) {
    var n = data.x.length, xs = data.x.slice(), end = data.projection.x[1];
    if (end > xs[n - 1]) xs.push(end);
    var columns = [xs], series = [{}], running = new Array(n).fill(0);
    data.series.forEach(function (block, i) {
      running = running.map(function (sum, j) { return sum + Math.max(0, block.values[j]); });
      var column = running.slice();
      if (xs.length > n) column.push(null);
      columns.push(column);
      series.push({ label: block.grant_id + " (" + block.category + ")", stroke: color(i), fill: color(i, 0.25),
                    width: 1.5, value: function (u, v) { return formatCredits(v); } });
    });
    var projection = new Array(xs.length).fill(null);
    projection[n - 1] = data.projection.y[0];
    projection[xs.length - 1] = data.projection.y[1];
    columns.push(projection);
    series.push({ label: "projection", stroke: "#1b1f24", dash: [4, 4], width: 1.5, spanGaps: true,
                  value: function (u, v) { return formatCredits(v); } });
    var lines = data.markers.map(function (m) {
      return { t: m.t, color: m.kind === "void" ? "#a0111f" : "#b35900", dash: [6, 4] };
    });
    lines.push({ t: data.now, color: "#1b1f24", width: 2 });
    // Stacked areas: each series is the sum of the blocks below it, so fill each down to the one below.
    var bands = [];
    for (var s = 2; s <= data.series.length; s++) bands.push({ series: [s, s - 1], fill: color(s - 1, 0.25) });
    return {
      width: el.clientWidth, height: 320, series: series, bands: bands,
      scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max) * 1.05]; } } },
      axes: [{}, { values: function (u, ticks) { return ticks.map(formatCredits); }, size: 80 }],
      hooks: { draw: [verticalLines(lines)] }, _columns: columns
    };
  }

  function usageOptions(el, data) {
    var series = [{}];
    data.series.forEach(function (model, i) {
      series.push({ label: model.model, stroke: color(i), fill: color(i, 0.2), width: 1.5,
                    paths: uPlot.paths.stepped({ align: 1 }), value: function (u, v) { return formatCredits(v); } });
    });
    return { width: el.clientWidth, height: 240, series: series,
             axes: [{}, { values: function (u, ticks) { return ticks.map(formatCredits); }, size: 80 }],
             _columns: [data.x].concat(data.series.map(function (m) { return m.values; })) };
  }

  function showProjection(data) {
    var el = document.getElementById("burndown-projection");
    if (!el) return;
    var p = data.projection;
    if (p.runs_out_at == null) {
      el.textContent = data.remaining_total > 0 ? "No credit consumed in the recent window: no run-out in sight."
                                                 : "No credit left.";
    } else {
      el.textContent = "At this rate (" + formatCredits(p.burn_per_day) + " credits a day) the credit runs out on " +
                       dateText(p.runs_out_at) + ".";
    }
  }

  function draw(el) {
    var kind = el.dataset.chart, width = Math.max(16, Math.floor(el.clientWidth || 800));
    var url = el.dataset.src + (el.dataset.src.indexOf("?") < 0 ? "?" : "&") + "width=" + width;
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error(kind + " chart: HTTP " + r.status); return r.json(); })
      .then(function (data) {
        var opts = kind === "burndown" ? burndownOptions(el, data) : usageOptions(el, data);
        var columns = opts._columns; delete opts._columns;
        if (charts[el.id]) charts[el.id].destroy();
        el.textContent = "";
        charts[el.id] = new uPlot(opts, columns, el);
        if (kind === "burndown") {
          showProjection(data);
          el.dataset.remaining = String(data.remaining_total);
          el.dataset.points = String(data.points);
        }
        el.dataset.loaded = String(Number(el.dataset.loaded || 0) + 1);
      })
      .catch(function (error) { el.dataset.error = String(error); console.warn(String(error)); });
  }

  function drawAll() { document.querySelectorAll("[data-chart]").forEach(draw); }

  document.addEventListener("DOMContentLoaded", function () {
    drawAll();
    document.body.addEventListener("htmx:afterSwap", function (event) {
      if (event.detail.target && event.detail.target.id === "balance-refresh") drawAll();
    });
  });
})();
