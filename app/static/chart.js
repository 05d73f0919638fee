// A small SVG line chart over sampler steps: one or two y axes, series with gaps (null), a tooltip per point.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 170;
const MARGIN = { top: 10, bottom: 26, left: 38, right: 10 };
const MAX_DOTS = 80; // beyond this many points a series is a line only

function node(name, attrs = {}, text) {
  const el = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

export function formatNumber(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.001) return v.toExponential(2);
  return String(Number(v.toPrecision(a >= 100 ? 4 : 3)));
}

// Three or so round ticks from 0 to at least max.
function ticks(max) {
  const raw = max / 4;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const top = Math.ceil(max / step - 1e-9) * step;
  const out = [];
  for (let v = 0; v <= top + step / 2; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function axisMax(values) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  const max = finite.length ? Math.max(...finite) : 1;
  return max > 0 ? max * 1.05 : 1;
}

// A message in place of the chart (no data yet, invalid settings).
export function drawMessage(svg, text) {
  svg.replaceChildren(node("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "message" }, text));
}

/**
 * steps: number of x positions (0 .. steps - 1).
 * series: [{points: [[step, y|null], ...], cls, axis: "left"|"right", shape: "line"|"step", tip: (index) => string}]
 * refs:   [{value, cls, axis}] horizontal reference lines.
 * labels: {left, right} axis titles.
 */
export function drawChart(svg, { steps, series, refs = [], labels = {} }) {
  const hasRight = series.some((s) => s.axis === "right");
  const margin = { ...MARGIN, right: hasRight ? 38 : MARGIN.right };
  const plotW = WIDTH - margin.left - margin.right;
  const plotH = HEIGHT - margin.top - margin.bottom;
  const values = (axis) => [
    ...series.filter((s) => (s.axis ?? "left") === axis).flatMap((s) => s.points.map((p) => p[1])),
    ...refs.filter((r) => (r.axis ?? "left") === axis).map((r) => r.value),
  ];
  const yTicks = { left: ticks(axisMax(values("left"))) };
  if (hasRight) yTicks.right = ticks(axisMax(values("right")));
  // Each step owns a slot of the x axis, its value drawn at the slot's middle.
  const x = (i) => margin.left + ((i + 0.5) / steps) * plotW;
  const half = plotW / steps / 2;
  const y = (v, axis = "left") => {
    const t = yTicks[axis];
    return margin.top + plotH - (v / t[t.length - 1]) * plotH;
  };

  const out = [];
  for (const v of yTicks.left) {
    out.push(node("line", { x1: margin.left, x2: margin.left + plotW, y1: y(v), y2: y(v), class: "grid-line" }));
    out.push(node("text", { x: margin.left - 4, y: y(v) + 3, "text-anchor": "end" }, formatNumber(v)));
  }
  if (hasRight) {
    for (const v of yTicks.right) {
      const yy = y(v, "right");
      out.push(node("text", { x: margin.left + plotW + 4, y: yy + 3, "text-anchor": "start" }, formatNumber(v)));
    }
  }
  const bottom = margin.top + plotH;
  out.push(node("line", { x1: margin.left, x2: margin.left + plotW, y1: bottom, y2: bottom, class: "axis" }));
  out.push(node("line", { x1: margin.left, x2: margin.left, y1: margin.top, y2: bottom, class: "axis" }));
  const xTicks = [...new Set([0, Math.floor((steps - 1) / 2), steps - 1])].filter((i) => i >= 0);
  for (const i of xTicks) {
    out.push(node("text", { x: x(i), y: bottom + 12, "text-anchor": "middle" }, String(i)));
  }
  out.push(node("text", { x: margin.left + plotW / 2, y: HEIGHT - 2, "text-anchor": "middle" }, "step"));
  if (labels.left) {
    const at = `translate(10 ${margin.top + plotH / 2}) rotate(-90)`;
    out.push(node("text", { transform: at, "text-anchor": "middle" }, labels.left));
  }
  if (labels.right && hasRight) {
    const at = `translate(${WIDTH - 4} ${margin.top + plotH / 2}) rotate(-90)`;
    out.push(node("text", { transform: at, "text-anchor": "middle" }, labels.right));
  }

  for (const r of refs) {
    const yy = y(r.value, r.axis);
    out.push(node("line", { x1: margin.left, x2: margin.left + plotW, y1: yy, y2: yy, class: `line ${r.cls}` }));
  }
  for (const s of series) {
    const axis = s.axis ?? "left";
    // A per-step value (a scale) is level across its step's slot; a measurement (a norm) joins its points.
    let d = "";
    let pen = false;
    for (const [i, v] of s.points) {
      if (v === null || !Number.isFinite(v)) {
        pen = false;
        continue;
      }
      const [xx, yy] = [x(i).toFixed(1), y(v, axis).toFixed(1)];
      if (s.shape === "step") d += `${pen ? `V${yy}` : `M${(x(i) - half).toFixed(1)},${yy}`}H${(x(i) + half).toFixed(1)}`;
      else d += `${pen ? "L" : "M"}${xx},${yy}`;
      pen = true;
    }
    if (d) out.push(node("path", { d, class: `line ${s.cls}` }));
    if (s.points.length <= MAX_DOTS) {
      s.points.forEach(([i, v], k) => {
        if (v === null || !Number.isFinite(v)) return;
        const dot = node("circle", { cx: x(i), cy: y(v, axis), r: 2.5, class: `dot ${s.cls}` });
        if (s.tip) dot.append(node("title", {}, s.tip(k)));
        out.push(dot);
      });
    }
  }
  svg.replaceChildren(...out);
}
