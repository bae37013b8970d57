// The node's API as the page uses it: every call sends the key from session storage as
// `Authorization: Bearer`; a 401 becomes an AuthError so the page can ask for a key.

const KEY = 'pod.apiKey';

/** The node refused the request's key (or its lack of one). */
export class AuthError extends Error {
  constructor(sentKey) {
    super(sentKey ? 'The API key was refused.' : 'This node requires an API key.');
    this.sentKey = sentKey;
  }
}

/** Any other failed call: an HTTP error status, or the node out of reach. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The stored key, or null. */
export function apiKey() {
  return sessionStorage.getItem(KEY);
}

/** Stores the key for this tab. */
export function setApiKey(key) {
  sessionStorage.setItem(KEY, key);
}

/** Forgets the stored key. */
export function forgetApiKey() {
  sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const out = { ...extra };
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body?.error?.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

async function send(path, init) {
  let res;
  try {
    res = await fetch(path, { cache: 'no-store', ...init });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'the node is out of reach');
  }
  if (res.status === 401) throw new AuthError(Boolean(apiKey()));
  return res;
}

/** GETs JSON; `null` when the route answers 404 (e.g. a node without a mesh). */
export async function getJson(path) {
  const res = await send(path, { headers: headers({ Accept: 'application/json' }) });
  if (res.status === 404) return null;
  if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
  return res.json();
}

/** POSTs JSON and returns the response (its body unread) once it is a success. */
export async function postJson(path, body, signal) {
  const res = await send(path, {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
  return res;
}
