// The overview: follows GET /v2/events and draws each snapshot; operator actions go through
// the same HTTP endpoints as `llorch` (and are refused here as the API refuses them).
'use strict';

(() => {
  const { el, ms, mib } = llorch;
  let controller = null;
  let retry = null;

  function cell(...children) {
    return el('td', {}, ...children);
  }

  function button(label, dataset) {
    return el('button', { type: 'button', dataset }, label);
  }

  function fill(id, rows) {
    document.querySelector(`#${id} tbody`).replaceChildren(...rows);
  }

  function drawNodes(snap) {
    const admin = snap.nodes !== undefined;
    document.getElementById('nodes-note').hidden = admin;
    const nodes = snap.nodes || [];
    fill('nodes', nodes.map((n) => el('tr', { dataset: { node: n.node_id } },
      cell(n.node_id),
      el('td', { className: 'state' }, n.draining ? `${n.state}, drained` : n.state),
      cell(ms(n.last_seen_ms) + ' ago'),
      cell(n.running),
      cell(n.version),
      cell(n.draining
        ? button('Resume', { action: 'resume-node', node: n.node_id })
        : button('Drain', { action: 'drain-node', node: n.node_id })))));
    const gpus = [];
    for (const n of nodes) {
      for (const g of (n.gpus && n.gpus.devices) || []) {
        gpus.push(el('tr', {},
          cell(n.node_id), cell(`cuda:${g.index}`), cell(g.name),
          cell(mib(g.memory_used_bytes)), cell(mib(g.memory_free_bytes)),
          cell(g.utilization_percent === undefined ? '–' : `${g.utilization_percent} %`)));
      }
    }
    if (!gpus.length) gpus.push(el('tr', {}, el('td', { colSpan: 6 }, admin ? 'No GPUs: CPU nodes only.' : '–')));
    fill('gpus', gpus);
  }

  function drawPools(snap) {
    fill('pools', snap.pools.map((p) => {
      const loaded = p.state !== 'standby';
      const actions = el('td', { className: 'actions' },
        p.state === 'draining'
          ? button('Resume', { action: 'resume', pool: p.pool_id, node: p.node_id })
          : button('Drain', { action: 'drain', pool: p.pool_id, node: p.node_id }));
      if (p.on_demand) {
        actions.append(loaded
          ? button('Unload', { action: 'unload', pool: p.pool_id, node: p.node_id })
          : button('Load', { action: 'load', pool: p.pool_id, node: p.node_id }));
      }
      const hit = p.prefix_cache_hit_rate;
      return el('tr', { dataset: { pool: p.pool_id, node: p.node_id } },
        cell(p.pool_id + (p.pinned ? ' (pinned)' : '')),
        cell(p.node_id),
        cell(p.model_id),
        el('td', { className: 'state' }, p.node_online ? p.state : `${p.state} (node offline)`),
        el('td', { className: 'slots' }, `${p.slots_busy}/${p.slots_total}`),
        cell(p.memory_charged ? mib(p.memory_charge_bytes) : '–'),
        cell(hit === undefined ? '–' : `${Math.round(hit * 100)} %`),
        cell(p.tokens_per_second === undefined ? '–' : String(p.tokens_per_second)),
        cell(p.restarts),
        el('td', { className: 'error-text' }, p.last_error || ''),
        actions);
    }));
  }

  function drawQueue(snap) {
    const q = snap.queue;
    document.getElementById('queue-summary').textContent =
      `${q.depth} waiting of ${q.capacity} (interactive ${q.interactive}, batch ${q.batch}); ` +
      `${q.running} running; policy ${q.policy}`;
    const rows = q.waiting.map((w) => el('tr', { dataset: { task: w.task_id || '' } },
      cell(w.position), cell(w.task_id || '(another client)'), cell(w.model), cell(w.priority),
      cell(ms(w.waited_ms)), cell('in ' + ms(w.predicted_start_ms))));
    if (!rows.length) rows.push(el('tr', {}, el('td', { colSpan: 6 }, 'Nothing waits.')));
    fill('waiting', rows);
  }

  function drawTasks(snap) {
    const rows = snap.tasks.map((t) => {
      const live = t.state === 'queued' || t.state === 'running';
      const tokens = `${t.tokens_in ?? '–'}/${t.cached_tokens ?? '–'}/${t.tokens_out}`;
      return el('tr', { dataset: { task: t.task_id || '', state: t.state } },
        cell(t.task_id || '–'),
        cell(t.client || ''),
        cell(t.model),
        el('td', { className: 'state' }, t.state),
        cell(t.pool_id ? `${t.pool_id} on ${t.node_id || '?'}` : '–'),
        cell(t.placement.join('; ')),
        cell(ms(t.queue_ms)),
        cell(ms(t.ttft_ms)),
        cell(tokens),
        cell(t.tokens_per_second === undefined ? '–' : String(t.tokens_per_second)),
        el('td', { className: 'error-text', title: t.error || '' }, t.outcome || ''),
        cell(live && t.task_id ? button('Cancel', { action: 'cancel', task: t.task_id }) : ''));
    });
    if (!rows.length) rows.push(el('tr', {}, el('td', { colSpan: 12 }, 'No tasks yet.')));
    fill('tasks', rows);
  }

  function draw(snap) {
    const v = snap.viewer;
    document.getElementById('who').textContent =
      `Live · viewing as ${v.name}${v.admin ? ' (admin)' : ''} · ${new Date(snap.at_ms).toLocaleTimeString()}`;
    drawNodes(snap);
    drawPools(snap);
    drawQueue(snap);
    drawTasks(snap);
  }

  function notice(n) {
    const list = document.getElementById('notices');
    const text = {
      node_joined: () => `Node ${n.node_id} joined.`,
      node_lost: () => `Node ${n.node_id} lost: ${n.reason}`,
      pool_state_changed: () => `Pool ${n.pool_id} on ${n.node_id}: ${n.old || '(new)'} → ${n.new || '(gone)'} (${n.reason})`,
      queue_saturated: () => `The queue is full (${n.depth} waiting).`,
    }[n.kind];
    list.prepend(el('li', {}, `${new Date().toLocaleTimeString()} ${text ? text() : n.kind}`));
    while (list.children.length > 50) list.lastChild.remove();
  }

  async function connect() {
    if (controller) controller.abort();
    clearTimeout(retry);
    controller = new AbortController();
    const signal = controller.signal;
    const who = document.getElementById('who');
    try {
      const resp = await fetch('/v2/events', { headers: llorch.headers(), signal });
      if (!resp.ok) {
        who.textContent = 'Not connected';
        llorch.show(await llorch.errorOf(resp));
        if (resp.status === 401) return; // waits for a credential
        throw new Error('refused');
      }
      llorch.show('');
      for await (const { event, data } of llorch.events(resp)) {
        if (event === 'snapshot') draw(JSON.parse(data));
        else if (event === 'notice') notice(JSON.parse(data));
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    who.textContent = 'Disconnected; reconnecting…';
    retry = setTimeout(connect, 2000);
  }

  async function act(b) {
    const d = b.dataset;
    const path = {
      drain: () => `/v2/pools/${encodeURIComponent(d.pool)}/drain?node=${encodeURIComponent(d.node)}`,
      resume: () => `/v2/pools/${encodeURIComponent(d.pool)}/resume?node=${encodeURIComponent(d.node)}`,
      load: () => `/v2/pools/${encodeURIComponent(d.pool)}/load?node=${encodeURIComponent(d.node)}`,
      unload: () => `/v2/pools/${encodeURIComponent(d.pool)}/unload?node=${encodeURIComponent(d.node)}`,
      'drain-node': () => `/v2/nodes/${encodeURIComponent(d.node)}/drain`,
      'resume-node': () => `/v2/nodes/${encodeURIComponent(d.node)}/resume`,
      cancel: () => `/v2/tasks/${encodeURIComponent(d.task)}/cancel`,
    }[d.action];
    if (!path) return;
    const what = d.task ? `task ${d.task}` : d.pool ? `pool ${d.pool}` : `node ${d.node}`;
    b.disabled = true;
    try {
      const answer = await llorch.post(path());
      const result = d.task ? (answer.canceled ? 'cancelled' : 'it had already ended')
        : d.pool ? `now ${answer.state}`
          : answer.draining ? `drained (${answer.running} running)` : 'resumed';
      llorch.show(`${d.action} ${what}: ${result}`, 'ok');
    } catch (e) {
      llorch.show(`${d.action} ${what} refused: ${e.message}`);
    } finally {
      b.disabled = false;
    }
  }

  document.querySelector('main').addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-action]');
    if (b) act(b);
  });
  llorch.bindCredential(connect);
  connect();
})();
