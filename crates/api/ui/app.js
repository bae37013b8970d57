// The dashboard: polls the node's API every two seconds and renders each view; asks for an API
// key when the node wants one.

import { ApiError, AuthError, apiKey, forgetApiKey, getJson, setApiKey } from './api.js';
import { chatPanel } from './chat.js';
import { renderCharts } from './chart.js';
import { replace } from './dom.js';
import { renderGraph } from './graph.js';
import { renderFiles, renderModels, renderNode, renderPeers, renderReceipts } from './views.js';

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let node = null;
let timer = null;
let askingKey = false;

const status = (text, kind) => {
  const el = $('status');
  el.textContent = text;
  el.className = `status ${kind || ''}`;
};

function askForKey(err) {
  clearTimeout(timer);
  timer = null;
  if (askingKey) return;
  askingKey = true;
  status('locked', 'bad');
  const dialog = $('key-dialog');
  const message = $('key-message');
  message.textContent = err.sentKey
    ? 'That API key was refused (401). Enter a valid key for this node.'
    : 'This node requires an API key.';
  message.className = err.sentKey ? 'error-text' : '';
  if (err.sentKey) forgetApiKey();
  $('key-input').value = '';
  dialog.showModal();
}

$('key-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const key = $('key-input').value.trim();
  if (!key) return;
  setApiKey(key);
  askingKey = false;
  $('key-dialog').close();
  poll();
});
// Escape would close the dialog and leave a locked page with nothing to do.
$('key-dialog').addEventListener('cancel', (ev) => ev.preventDefault());
$('forget-key').addEventListener('click', () => {
  forgetApiKey();
  location.reload();
});

const setChatModels = chatPanel({
  form: $('chat-form'),
  log: $('chat-log'),
  model: $('chat-model'),
  input: $('chat-input'),
  send: $('chat-send'),
  stop: $('chat-stop'),
  reset: $('chat-reset'),
  selfId: () => node?.peer_id,
  onAuth: askForKey,
});

async function poll() {
  clearTimeout(timer);
  timer = null;
  try {
    const [n, peers, models, receipts, files, stats] = await Promise.all([
      getJson('/pod/v1/node'),
      getJson('/pod/v1/peers'),
      getJson('/v1/models'),
      getJson('/pod/v1/receipts'),
      getJson('/pod/v1/files'),
      getJson('/pod/v1/stats'),
    ]);
    node = n;
    const peerList = peers ? peers.data : [];
    const modelList = models ? models.data : [];
    const local = modelList.filter((m) => !node || m.owned_by === node.peer_id).map((m) => ({ name: m.id }));
    renderNode($('node-info'), node, stats);
    renderGraph($('mesh-graph'), node, peerList, local);
    renderPeers($('peers-table'), peerList);
    const connected = peerList.filter((p) => p.connected).length;
    replace($('mesh-count'), `${connected} connected · ${peerList.length} known`);
    renderModels($('models-table'), modelList, peerList, node, stats);
    renderCharts($('charts'), stats);
    renderReceipts($('receipts-table'), $('receipts-count'), receipts);
    renderFiles($('files-table'), files);
    setChatModels(modelList);
    $('forget-key').hidden = !apiKey();
    status('live', 'ok');
    document.body.dataset.ready = 'true';
  } catch (e) {
    if (e instanceof AuthError) {
      askForKey(e);
      return;
    }
    status(e instanceof ApiError ? `offline: ${e.message}` : `error: ${e.message}`, 'bad');
  }
  if (!askingKey) timer = setTimeout(poll, POLL_MS);
}

poll();
