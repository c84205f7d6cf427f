// The playground: a streamed chat with one model through the public OpenAI endpoint, like any
// client; time to first token and tokens per second are measured here, in the browser.
'use strict';

(() => {
  const { el } = llorch;
  let messages = [];
  let controller = null;

  async function loadModels() {
    const who = document.getElementById('who');
    const select = document.getElementById('model');
    try {
      const resp = await fetch('/v1/models', { headers: llorch.headers() });
      if (!resp.ok) throw new Error(await llorch.errorOf(resp));
      const list = (await resp.json()).data || [];
      const keep = select.value;
      select.replaceChildren(...list.map((m) => el('option', { value: m.id }, m.id)));
      if (list.some((m) => m.id === keep)) select.value = keep;
      who.textContent = `${list.length} model${list.length === 1 ? '' : 's'}`;
      llorch.show('');
    } catch (e) {
      who.textContent = 'Not connected';
      llorch.show(e.message);
    }
  }

  function bubble(role, text) {
    const body = el('div', { className: 'text' }, text);
    const item = el('li', { className: role, dataset: { role } }, el('span', { className: 'role' }, role), body);
    document.getElementById('chat').append(item);
    item.scrollIntoView({ block: 'end' });
    return body;
  }

  function busy(on) {
    document.getElementById('send').disabled = on;
    document.getElementById('stop').disabled = !on;
  }

  async function send(prompt) {
    const model = document.getElementById('model').value;
    const system = document.getElementById('system').value.trim();
    const temperature = Number(document.getElementById('temperature').value);
    const maxTokens = Number(document.getElementById('max-tokens').value);
    messages.push({ role: 'user', content: prompt });
    bubble('user', prompt);
    const out = bubble('assistant', '');
    const stats = document.getElementById('stats');
    stats.textContent = 'Waiting for the first token…';
    controller = new AbortController();
    busy(true);
    const sent = performance.now();
    let first = null;
    let text = '';
    let usage = null;
    try {
      const resp = await fetch('/v1/chat/completions', {
        method: 'POST',
        headers: llorch.headers({ 'Content-Type': 'application/json' }),
        body: JSON.stringify({
          model,
          messages: system ? [{ role: 'system', content: system }, ...messages] : messages,
          stream: true,
          stream_options: { include_usage: true },
          temperature,
          max_tokens: maxTokens,
        }),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await llorch.errorOf(resp));
      for await (const { data } of llorch.events(resp)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || 'the stream failed');
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          text += delta.content;
          out.textContent = text;
        }
      }
      messages.push({ role: 'assistant', content: text });
      const end = performance.now();
      const parts = [];
      if (first !== null) parts.push(`time to first token ${Math.round(first - sent)} ms`);
      if (usage) {
        parts.push(`${usage.completion_tokens} tokens`);
        if (first !== null && end > first && usage.completion_tokens > 1) {
          parts.push(`${((usage.completion_tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s`);
        }
      }
      stats.textContent = parts.join(' · ');
      stats.dataset.done = 'true';
    } catch (e) {
      messages.pop();
      if (controller.signal.aborted) stats.textContent = 'Stopped.';
      else {
        stats.textContent = '';
        llorch.show(e.message);
      }
    } finally {
      busy(false);
      controller = null;
    }
  }

  document.getElementById('ask').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const box = document.getElementById('prompt');
    const prompt = box.value.trim();
    if (!prompt || controller) return;
    box.value = '';
    delete document.getElementById('stats').dataset.done;
    send(prompt);
  });
  document.getElementById('stop').addEventListener('click', () => controller && controller.abort());
  document.getElementById('clear').addEventListener('click', () => {
    if (controller) controller.abort();
    messages = [];
    document.getElementById('chat').replaceChildren();
    document.getElementById('stats').textContent = '';
  });
  llorch.bindCredential(loadModels);
  loadModels();
})();
