// Small line plots drawn as SVG: no library. series: [{ label, points: [[x, y], ...] }], drawn in the order given
// with the classes line-0, line-1, ... (colours in app.css).

const NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a URL that is fetched
const W = 320;
const H = 120;
const PAD = 28;

function el(name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export const svg = () => document.createElementNS(NS, "svg");

export function fmt(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(a >= 0.01 || a === 0 ? 2 : 4);
}

export function plot(svg, series) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const last = series.map((s) => `${s.label} ${fmt(s.points.at(-1)?.[1])}`).join(", ");
  svg.setAttribute("aria-label", all.length ? `latest: ${last}` : "no data yet");
  svg.append(el("rect", { x: PAD, y: 4, width: W - PAD - 4, height: H - PAD, class: "frame" }));
  if (!all.length) {
    svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "no data yet"));
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const y0 = Math.min(0, ...ys);
  const y1 = Math.max(...ys) > y0 ? Math.max(...ys) : y0 + 1;
  const sx = (x) => PAD + ((x - x0) / (x1 - x0 || 1)) * (W - PAD - 4);
  const sy = (y) => 4 + (1 - (y - y0) / (y1 - y0)) * (H - PAD);
  svg.append(el("text", { x: PAD - 3, y: 12, "text-anchor": "end", class: "axis" }, fmt(y1)));
  svg.append(el("text", { x: PAD - 3, y: H - PAD + 4, "text-anchor": "end", class: "axis" }, fmt(y0)));
  series.forEach((s, i) => {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!pts.length) return;
    const d = pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    svg.append(el("polyline", { points: d, class: `line line-${i}` }));
    svg.append(el("text", { x: PAD + 4 + i * 110, y: H - 6, class: `legend line-${i}` }, s.label));
  });
}
