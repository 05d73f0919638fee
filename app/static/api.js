// Requests to the service. Every one carries X-API-Key when a key is set, which is why the event streams
// are read from fetch() bodies: EventSource cannot send headers.

let apiKey = "";

export function setApiKey(key) {
  apiKey = key.trim();
}

export function hasApiKey() {
  return apiKey !== "";
}

// Relative to the page, so the page works wherever the app is mounted.
export function apiUrl(path) {
  return new URL(path, document.baseURI).href;
}

export function request(path, { method = "GET", body, signal, accept } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (accept) headers["Accept"] = accept;
  if (apiKey) headers["X-API-Key"] = apiKey;
  const init = { method, headers, signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  return fetch(apiUrl(path), init);
}

// The JSON body of a response, or null when it has none (a gateway's HTML error page, an aborted read).
export async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

// Server-sent events from a response body, as {event, data} (the text/event-stream format of the HTML
// standard: "event:" and "data:" lines, a blank line ends an event, ":" lines are comments).
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let event = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      pending += value;
      const lines = pending.split("\n");
      pending = lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "message";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// One line for a response that is neither a success nor a 422.
export function describeFailure(response, body) {
  const detail = typeof body?.detail === "string" ? body.detail : response.statusText;
  const retry = response.headers.get("Retry-After");
  const hints = {
    401: "the gateway asks for an API key",
    403: "the API key was refused",
    429: "too many requests: wait a moment",
  };
  let text = `${response.status}: ${hints[response.status] ?? detail}`;
  if (retry) text += ` (retry in ${retry} s)`;
  return text;
}
