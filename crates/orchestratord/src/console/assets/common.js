// What both console pages share: the credential, API calls, error text, server-sent events
// and building elements. Everything that came from the server or a model is put on the page
// as text (textContent), never as markup.
'use strict';

const llorch = (() => {
  const KEY = 'llorch-credential';

  // The credential lives in this tab's session storage: it is gone when the tab closes, and
  // it is only ever sent as `Authorization: Bearer` to this origin.
  function credential() {
    return sessionStorage.getItem(KEY) || '';
  }

  function setCredential(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const c = credential();
    if (c) h.Authorization = 'Bearer ' + c;
    return h;
  }

  // The text of an error answer, in any of the API's envelopes.
  async function errorOf(resp) {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      const e = body.error && typeof body.error === 'object' ? body.error : body;
      if (e && e.message) {
        const code = e.code || e.type || '';
        return `${resp.status} ${code}: ${e.message}`;
      }
    } catch (_) { /* not JSON */ }
    return `${resp.status}: ${text.slice(0, 300)}`;
  }

  // POST to the API with an empty body; resolves to the parsed answer, rejects with its error.
  async function post(path) {
    const resp = await fetch(path, { method: 'POST', headers: headers() });
    if (!resp.ok) throw new Error(await errorOf(resp));
    return resp.json();
  }

  // The events of a server-sent event stream, as {event, data}.
  async function* events(resp) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (data.length) yield { event, data: data.join('\n') };
      }
    }
  }

  // An element with properties (`dataset`, `className`…) and children (strings become text).
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'dataset') Object.assign(e.dataset, v);
      else e[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(typeof c === 'string' || typeof c === 'number' ? String(c) : c);
    }
    return e;
  }

  function show(text, kind) {
    const m = document.getElementById('message');
    m.textContent = text;
    m.dataset.kind = kind || 'error';
    m.hidden = !text;
  }

  // The credential form of the header: `changed` runs after the credential was set or forgotten.
  function bindCredential(changed) {
    const form = document.getElementById('credential');
    const input = document.getElementById('key');
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      setCredential(input.value.trim());
      input.value = '';
      changed();
    });
    document.getElementById('forget').addEventListener('click', () => {
      setCredential('');
      changed();
    });
  }

  function ms(n) {
    if (n === undefined || n === null) return '–';
    return n < 1000 ? `${n} ms` : `${(n / 1000).toFixed(1)} s`;
  }

  function mib(bytes) {
    if (bytes === undefined || bytes === null) return '–';
    return `${Math.round(bytes / 1048576)} MiB`;
  }

  return { credential, headers, errorOf, post, events, el, show, bindCredential, ms, mib };
})();
