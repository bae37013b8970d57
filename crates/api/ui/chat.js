// The chat panel: streams an answer from `/v1/chat/completions` (server-sent events read with
// fetch and a ReadableStream) from any chat model of the mesh, and names the pod that served
// it from the `x-pod-served-by` header.

import { AuthError, postJson } from './api.js';
import { h, replace, short } from './dom.js';

const SERVED_BY = 'x-pod-served-by';

/** Yields the JSON payloads of an SSE body until `[DONE]`. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block
        .split(/\r?\n/)
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trimStart())
        .join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}

/** Wires the chat panel. `onAuth` is called with an AuthError so the page can ask for a key. */
export function chatPanel({ form, log, model, input, send, stop, reset, selfId, onAuth }) {
  let messages = [];
  let controller = null;

  function bubble(role, text) {
    const el = h('div', { class: `msg ${role}` }, h('div', { class: 'text' }, text));
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return el;
  }

  function busy(on) {
    send.disabled = on;
    stop.hidden = !on;
  }

  async function ask(text) {
    messages.push({ role: 'user', content: text });
    bubble('user', text);
    const answer = bubble('assistant', '');
    answer.classList.add('streaming');
    const out = answer.querySelector('.text');
    const meta = h('div', { class: 'meta' }, 'waiting…');
    answer.append(meta);
    controller = new AbortController();
    busy(true);
    let reply = '';
    try {
      const res = await postJson(
        '/v1/chat/completions',
        { model: model.value, messages, stream: true, max_tokens: 256 },
        controller.signal,
      );
      const by = res.headers.get(SERVED_BY) || '';
      answer.dataset.servedBy = by;
      const who = by === selfId() ? 'this pod' : 'peer';
      replace(meta, `${model.value} · served by `, h('span', { class: 'peer', title: by, 'data-peer-id': by }, short(by)), ` (${who})`);
      for await (const chunk of events(res.body)) {
        if (chunk.error) throw new Error(chunk.error.message || 'the stream failed');
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          reply += delta;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
      }
      messages.push({ role: 'assistant', content: reply });
      answer.dataset.done = 'true';
    } catch (e) {
      if (e.name === 'AbortError') {
        if (reply) messages.push({ role: 'assistant', content: reply });
        answer.append(h('div', { class: 'meta' }, 'stopped'));
      } else {
        messages.pop();
        answer.classList.add('error');
        answer.append(h('div', { class: 'meta error-text' }, e.message));
        if (e instanceof AuthError) onAuth(e);
      }
    } finally {
      answer.classList.remove('streaming');
      controller = null;
      busy(false);
    }
  }

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller || !model.value) return;
    input.value = '';
    ask(text);
  });
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener('click', () => controller?.abort());
  reset.addEventListener('click', () => {
    controller?.abort();
    messages = [];
    replace(log);
  });

  /** Offers the chat models of the mesh, keeping the current choice. */
  return function setModels(models) {
    const chat = models.filter((m) => m.kind === 'chat').map((m) => m.id);
    const current = model.value;
    const have = [...model.options].map((o) => o.value);
    if (have.join('\n') !== chat.join('\n')) {
      replace(model, chat.map((id) => h('option', { value: id }, id)));
      if (chat.includes(current)) model.value = current;
    }
    send.disabled = Boolean(controller) || chat.length === 0;
  };
}
