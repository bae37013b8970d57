// Throughput charts: one small SVG line chart per series over the stats window.

import { h, s, replace } from './dom.js';

const W = 300;
const H = 90;
const PAD = 4;

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function path(points) {
  return points.map(([x, y], i) => `${i ? 'L' : 'M'}${x.toFixed(1)} ${y.toFixed(1)}`).join(' ');
}

function span(seconds) {
  return seconds < 90 ? `−${Math.round(seconds)} s` : `−${Math.round(seconds / 60)} min`;
}

function chart(title, unit, values, now, windowSeconds) {
  const known = values.filter((v) => v != null);
  const max = niceMax(Math.max(0, ...known));
  const n = values.length;
  const x = (i) => PAD + ((W - 2 * PAD) * i) / Math.max(n - 1, 1);
  const y = (v) => H - PAD - ((H - 2 * PAD) * v) / max;
  // Lines break where a series has no value (no first token in that interval).
  const runs = [];
  let run = [];
  values.forEach((v, i) => {
    if (v == null) {
      if (run.length) runs.push(run);
      run = [];
    } else run.push([x(i), y(v)]);
  });
  if (run.length) runs.push(run);
  const lines = runs.map((r) =>
    r.length === 1 ? s('circle', { cx: r[0][0], cy: r[0][1], r: 2, class: 'dot' }) : s('path', { d: path(r), class: 'line' }),
  );
  const area = runs
    .filter((r) => r.length > 1)
    .map((r) => s('path', { d: `${path(r)} L${r[r.length - 1][0].toFixed(1)} ${H - PAD} L${r[0][0].toFixed(1)} ${H - PAD} Z`, class: 'area' }));
  return h(
    'figure',
    { class: 'chart' },
    h('figcaption', null, h('span', null, title), h('strong', { class: 'value' }, now)),
    s(
      'svg',
      { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': `${title}, last ${span(windowSeconds).slice(1)}` },
      s('line', { x1: PAD, x2: W - PAD, y1: y(max), y2: y(max), class: 'grid' }),
      s('line', { x1: PAD, x2: W - PAD, y1: y(max / 2), y2: y(max / 2), class: 'grid' }),
      area,
      lines,
    ),
    h('div', { class: 'axis' }, h('span', null, span(windowSeconds)), h('span', null, `max ${max} ${unit}`), h('span', null, 'now')),
  );
}

function mean(list) {
  const known = list.filter((v) => v != null);
  return known.length ? known.reduce((a, b) => a + b, 0) / known.length : null;
}

/** Draws the charts of a `/pod/v1/stats` view into `el`. */
export function renderCharts(el, stats) {
  if (!stats) {
    replace(el, h('p', { class: 'empty' }, 'no data'));
    return;
  }
  const sm = stats.samples;
  const span = sm.length * stats.interval_seconds;
  // "Now" figures: the last 10 seconds for rates, the last minute for sparse events.
  const recent = (k) => sm.slice(-Math.ceil(k / stats.interval_seconds));
  const last10 = recent(10);
  const tokens10 = last10.reduce((a, x) => a + x.completion_tokens, 0);
  const secs10 = last10.reduce((a, x) => a + x.seconds, 0);
  const minute = recent(60);
  const reqs = minute.reduce((a, x) => a + x.requests, 0);
  const ttft = mean(minute.map((x) => x.ttft_ms));
  replace(
    el,
    chart('tokens/s', 'tok/s', sm.map((x) => x.tokens_per_second), (tokens10 / Math.max(secs10, 1e-3)).toFixed(1), span),
    chart('requests', `per ${stats.interval_seconds} s`, sm.map((x) => x.requests), `${reqs} /min`, span),
    chart('time to first token', 'ms', sm.map((x) => x.ttft_ms), ttft == null ? '–' : `${ttft.toFixed(0)} ms`, span),
    chart('queue depth', 'queued', sm.map((x) => x.queued), `${stats.queued} queued · ${stats.active} active`, span),
  );
}
