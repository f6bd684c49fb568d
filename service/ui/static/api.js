// The console's only way to the server: fetch with the admin key from this tab's sessionStorage as a bearer header
// (never in a URL, a cookie or localStorage), the server's own error message on failure, and SSE read from a
// fetch body (EventSource cannot send an Authorization header).

const KEY = "prefixserve.adminKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

// opts: method, json (a body sent as JSON), form (a FormData), signal, key (a key to try instead of the session's).
export async function api(path, opts = {}) {
  const headers = {};
  const key = opts.key ?? session.key;
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    body = opts.form;
  }
  const r = await fetch(path, { method: opts.method ?? "GET", headers, body, signal: opts.signal, cache: "no-store" });
  if (!r.ok) throw new ApiError(r.status, await errorMessage(r));
  return r;
}

export async function json(path, opts) {
  const r = await api(path, opts);
  return r.status === 204 ? null : r.json();
}

async function errorMessage(r) {
  const text = await r.text();
  try {
    const body = JSON.parse(text);
    return body?.error?.message ?? body?.detail ?? text;
  } catch {
    return text.slice(0, 500) || r.statusText;
  }
}

// Yields the data of each Server-Sent Event of a streamed response, parsed as JSON ("[DONE]" ends it).
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}
