// The dashboard's tables and facts, each rendered whole from the latest poll.

import { bytes, count, duration, h, replace, short, table } from './dom.js';

const peerCell = (id, self) =>
  h('span', { class: 'peer', title: id, 'data-peer-id': id }, short(id), self ? h('em', null, ' this pod') : null);

function load(l) {
  if (!l) return '–';
  const active = `${l.active}/${l.max_active} active`;
  return l.queued ? `${active} · ${l.queued} queued` : active;
}

/** This node's facts. */
export function renderNode(el, node, stats) {
  if (!node) {
    replace(el, h('dt', null, 'mesh'), h('dd', null, 'this node runs without a mesh'));
    return;
  }
  const addrs = (list) => (list.length ? list.map((a) => h('div', { class: 'addr' }, a)) : '–');
  const facts = [
    ['PeerId', h('code', { id: 'node-peer-id', class: 'peer-id' }, node.peer_id)],
    ['profile', node.profile],
    ['device', node.device || '–'],
    ['version', node.agent],
    ['uptime', duration(node.uptime_seconds)],
    ['NAT', node.nat_status],
    ['peers', `${node.connected_peers} connected · ${node.known_peers} known`],
    ['engine', stats ? `${stats.queued} queued · ${stats.active} active` : '–'],
    ['listening', addrs(node.listen_addrs)],
    ['external', addrs(node.external_addrs)],
  ];
  replace(el, facts.map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

/** The peer table. */
export function renderPeers(el, peers) {
  const rows = peers.map((p) =>
    h(
      'tr',
      { 'data-peer-id': p.peer_id, class: p.connected ? '' : 'gone' },
      h('td', null, peerCell(p.peer_id)),
      h('td', null, p.profile || '–'),
      h('td', null, p.device || '–'),
      h('td', null, p.models.map((m) => h('div', { class: 'nowrap' }, m.name))),
      h('td', { class: 'nowrap' }, load(p.load)),
      h('td', { class: 'num' }, p.rtt_ms == null ? '–' : `${p.rtt_ms.toFixed(1)} ms`),
      h('td', { class: 'nowrap' }, p.connected ? 'connected' : `seen ${duration(p.last_seen_ms / 1000)} ago`),
    ),
  );
  table(el, ['peer', 'profile', 'device', 'models', 'load', 'RTT', 'state'], rows, 'no peers yet');
}

/** Models of the mesh with the pods that serve them and their load. */
export function renderModels(el, models, peers, node, stats) {
  const self = node?.peer_id;
  const rows = models.map((m) => {
    const providers = [];
    const local = m.owned_by === self || !self;
    if (local) {
      const l = stats ? `${stats.queued} queued · ${stats.active} active` : '';
      providers.push(h('div', { 'data-provider': self || 'local' }, peerCell(self || 'this pod', Boolean(self)), l ? h('small', null, ` ${l}`) : null));
    }
    for (const p of peers) {
      if (p.connected && p.models.some((pm) => pm.name === m.id)) {
        providers.push(h('div', { 'data-provider': p.peer_id }, peerCell(p.peer_id), h('small', null, ` ${load(p.load)}`)));
      }
    }
    return h(
      'tr',
      { 'data-model': m.id },
      h('td', null, h('strong', null, m.id), h('div', { class: 'sub' }, [m.architecture, m.quantization].filter(Boolean).join(' · '))),
      h('td', null, m.kind),
      h('td', { class: 'num' }, m.context_length ? count(m.context_length) : '–'),
      h('td', null, providers.length ? providers : `${m.providers} pod(s)`),
    );
  });
  table(el, ['model', 'kind', 'context', 'served by'], rows, 'no models in the mesh yet');
}

/** Work served to and consumed from each peer. */
export function renderReceipts(el, countEl, receipts) {
  if (!receipts) {
    table(el, ['peer'], [], 'no mesh');
    return;
  }
  const totals = (t) => `${count(t.requests)} req · ${count(t.prompt_tokens)} in · ${count(t.completion_tokens)} out`;
  const rows = receipts.data.map((r) =>
    h('tr', { 'data-peer-id': r.peer }, h('td', null, peerCell(r.peer)), h('td', null, totals(r.served)), h('td', null, totals(r.consumed))),
  );
  const notes = [`${count(receipts.receipts)} signed`];
  if (receipts.invalid) notes.push(`${receipts.invalid} invalid`);
  if (receipts.torn) notes.push(`${receipts.torn} torn`);
  replace(countEl, notes.join(' · '));
  table(el, ['peer', 'served to it', 'consumed from it'], rows, 'no work exchanged yet');
}

/** Model files this node serves. */
export function renderFiles(el, files) {
  if (!files || !files.serving) {
    table(el, ['file'], [], 'this node does not serve model files (storage and full profiles do)');
    return;
  }
  const rows = files.data.map((f) =>
    h(
      'tr',
      { 'data-sha256': f.sha256 },
      h('td', null, h('strong', null, f.model), h('div', { class: 'sub', title: f.sha256 }, f.file)),
      h('td', { class: 'num' }, bytes(f.size)),
      h('td', { class: 'num' }, bytes(f.bytes_served)),
      h('td', { class: 'num' }, count(f.peers_served)),
    ),
  );
  table(el, ['file', 'size', 'sent', 'peers'], rows, 'no files yet (hashing on start)');
}
