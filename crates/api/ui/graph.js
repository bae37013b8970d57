// The mesh as an SVG graph: this pod in the middle, its peers on a circle, an edge per open
// connection (dashed for peers known but not connected), the round-trip time on each edge
// and on hover.

import { s, replace, short } from './dom.js';

const W = 420;
const H = 300;
const COLOURS = {
  full: '#16a34a',
  inference: '#2563eb',
  embedding: '#9333ea',
  relay: '#ea580c',
  storage: '#0891b2',
};

const colour = (profile) => COLOURS[profile] || '#64748b';

function label(models) {
  const names = models.map((m) => m.name);
  if (!names.length) return '';
  const first = names[0].length > 22 ? `${names[0].slice(0, 21)}…` : names[0];
  return names.length > 1 ? `${first} +${names.length - 1}` : first;
}

function pod(x, y, r, id, profile, models, tip, self) {
  return s(
    'g',
    { class: self ? 'pod self' : 'pod', 'data-peer-id': id, transform: `translate(${x.toFixed(1)} ${y.toFixed(1)})` },
    s('title', null, tip),
    s('circle', { r, fill: colour(profile), stroke: self ? '#f8fafc' : 'none', 'stroke-width': 3 }),
    s('text', { class: 'name', y: r + 13, 'text-anchor': 'middle' }, short(id)),
    s('text', { class: 'meta', y: r + 25, 'text-anchor': 'middle' }, [self ? 'this pod' : null, profile || '?', label(models)].filter(Boolean).join(' · ')),
  );
}

/** Draws the graph of `node` and `peers` into `svg`. */
export function renderGraph(svg, node, peers, localModels) {
  const cx = W / 2;
  const cy = H / 2 - 12;
  const edges = [];
  const pods = [];
  const n = peers.length;
  // An ellipse around this pod, turned half a step so that two peers do not sit level with it,
  // where their labels would run into its own.
  const rx = 175;
  const ry = 105;
  peers.forEach((p, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1) + Math.PI / (2 * Math.max(n, 1));
    const x = cx + rx * Math.cos(a);
    const y = cy + ry * Math.sin(a);
    const rtt = p.rtt_ms == null ? 'RTT unknown' : `RTT ${p.rtt_ms.toFixed(1)} ms`;
    edges.push(
      s(
        'g',
        { class: p.connected ? 'edge' : 'edge gone', 'data-peer-id': p.peer_id },
        s('title', null, `${short(node?.peer_id)} ↔ ${short(p.peer_id)}: ${rtt}`),
        s('line', { x1: cx, y1: cy, x2: x, y2: y, class: 'wire' }),
        s('line', { x1: cx, y1: cy, x2: x, y2: y, class: 'hit' }),
        p.rtt_ms == null ? null : s('text', { x: cx + (x - cx) * 0.7 + 8, y: cy + (y - cy) * 0.7, 'text-anchor': 'start', class: 'rtt' }, `${p.rtt_ms.toFixed(1)} ms`),
      ),
    );
    const tip = [
      p.peer_id,
      `profile: ${p.profile || '?'}`,
      `device: ${p.device || '?'}`,
      `models: ${p.models.map((m) => m.name).join(', ') || 'none'}`,
      rtt,
      p.load ? `load: ${p.load.queued} queued, ${p.load.active}/${p.load.max_active} active` : null,
    ].filter(Boolean).join('\n');
    pods.push(pod(x, y, 14, p.peer_id, p.profile, p.models, tip, false));
  });
  const selfTip = node ? `${node.peer_id}\nprofile: ${node.profile}\ndevice: ${node.device || '?'}` : 'this pod';
  pods.push(pod(cx, cy, 18, node?.peer_id || '', node?.profile, localModels, selfTip, true));
  replace(svg, s('g', { class: 'edges' }, edges), s('g', { class: 'pods' }, pods));
}
