// Handoff client for page A. Include it with <script src="/static/handoff.js" defer></script> on
// any page that has an element
//   <div data-handoff-job="JOB_ID"> … <p data-handoff-status></p> … </div>
// and, optionally, a <progress data-handoff-progress> bar and a <p data-handoff-message>.
// The tabs of a browser share one stream, /sse/watch?ids=…, held by a leader tab (see share());
// alone, a tab listens on /sse/connect/JOB_ID. `event: progress` moves the bar; `event: result`
// with status `result`, `failed` or `expired` moves the tab to data.moveUrl. Without EventSource
// it polls /api/jobs/JOB_ID. No inline script needed.
//
// The server's limits come from the page, where Handoff renders them from its own constants:
// data-handoff-max-watched (jobs per shared stream) and data-handoff-poll-ms (the polling
// interval). A page without the first does not share a stream; one without the second checks
// the API once instead of polling.
(() => {
  'use strict';

  // The whole protocol between the tabs of one browser, on the BroadcastChannel `handoff`. The
  // values never change, so that a tab still running an older copy of this script understands.
  const Msg = Object.freeze({
    HELLO: 'hello', //   {tab, id}: tab `tab` waits for job `id` (on arrival, and answering WHO)
    BYE: 'bye', //       {tab}: tab `tab` needs no more events (its job ended, or it is going)
    WHO: 'who', //       {}: a new leader asks every tab for its job
    EVENT: 'event', //   {name, data}: the leader passes on one event of its stream, as received
    LEADER: 'leader', // {tab}: the leader's heartbeat (heartbeat election)
    LEADS: 'leads?', //  {}: is there a leader? (heartbeat election)
    RESIGN: 'resign', // {tab}: the leader steps down (heartbeat election)
  });

  // The client's own pacing, which the server does not know: a refused stream is tried again
  // after RETRY_MS, doubling up to RETRY_MAX_MS; the leader gathers arrivals for REOPEN_MS
  // before it reopens its streams.
  const RETRY_MS = 3000;
  const RETRY_MAX_MS = 30000;
  const REOPEN_MS = 150;
  const JOB_ID = /^[A-Za-z0-9_-]{22}$/;

  const root = document.querySelector('[data-handoff-job]');
  if (!root) return;
  const jobId = root.dataset.handoffJob;
  const id = encodeURIComponent(jobId);
  const streamUrl = root.dataset.handoffStream || `/sse/connect/${id}`;
  const apiUrl = root.dataset.handoffApi || `/api/jobs/${id}`;
  const statusEl = root.querySelector('[data-handoff-status]');
  const bar = root.querySelector('[data-handoff-progress]');
  const messageEl = root.querySelector('[data-handoff-message]');

  // A limit the server rendered on the page: a positive whole number, or null where it names none.
  const limit = (value) => {
    const n = Number(value);
    return Number.isInteger(n) && n > 0 ? n : null;
  };
  const maxWatched = limit(root.dataset.handoffMaxWatched);
  const pollMs = limit(root.dataset.handoffPollMs);

  let finished = false;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const parse = (text) => {
    try { return JSON.parse(text); } catch { return null; }
  };

  function show(state, text) {
    root.dataset.state = state;
    if (statusEl) statusEl.textContent = text;
  }

  // Only addresses on this page's own origin are followed, whatever the server says: the URL is
  // resolved as the browser would resolve it (which strips tabs and newlines, and reads a
  // backslash as a slash), and its origin compared.
  function sameOrigin(url) {
    if (typeof url !== 'string' || !url.startsWith('/')) return null;
    let resolved;
    try { resolved = new URL(url, window.location.href); } catch { return null; }
    return resolved.origin === window.location.origin ? resolved.href : null;
  }

  // Shows a progress report: a percent fills the bar, none leaves it indeterminate.
  function showProgress(percent, message) {
    const known = typeof percent === 'number';
    if (bar) {
      if (known) {
        const shown = `${Math.round(percent)} %`;
        bar.max = 100;
        bar.value = percent;
        bar.textContent = shown;
        bar.setAttribute('aria-valuetext', message ? `${shown}, ${message}` : shown);
      } else {
        bar.removeAttribute('value');
        bar.textContent = '';
      }
    }
    if (messageEl) messageEl.textContent = message || '';
    if (known) show('progress', `Working on it: ${Math.round(percent)} %`);
  }

  // Each ending (the event's `result`, `failed`, `expired`, or the API's `complete`, …): the state
  // and what the user reads.
  const ENDINGS = new Map([
    ['result', ['done', 'Done. Taking you to the result…']],
    ['complete', ['done', 'Done. Taking you to the result…']],
    ['failed', ['failed', 'The job failed. Taking you to the details…']],
    ['expired', ['expired', 'The job took too long. Taking you to the details…']],
  ]);

  function moveTo(status, url) {
    if (finished) return;
    finished = true;
    const target = sameOrigin(url);
    if (!target) {
      show('invalid', 'The job ended, but its result address is not valid.');
      return;
    }
    show(...ENDINGS.get(status));
    window.location.assign(target);
  }

  function unknownJob() {
    finished = true;
    show('unknown', 'This job does not exist. The link may be mistyped, or the job has expired.');
  }

  // Asks the JSON API about the job: true while it is still pending (an ending moves the tab on).
  // Rejects when the API cannot be reached.
  async function check() {
    const answer = await fetch(apiUrl, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (answer.status === 404 || answer.status === 400) { unknownJob(); return false; }
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    const job = await answer.json();
    if (ENDINGS.has(job.status)) { moveTo(job.status, job.moveUrl); return false; }
    if (job.progress) showProgress(job.progress.percent, job.progress.message);
    return true;
  }

  // Without EventSource: asks the API every pollMs until the job ends (once, where the page names
  // no interval).
  async function poll() {
    const waiting = pollMs
      ? `Waiting for the job to finish (checking every ${pollMs / 1000} s)…`
      : 'Waiting for the job to finish. Reload the page to check again.';
    do {
      try {
        if (await check()) show('polling', waiting);
      } catch {
        show('reconnecting', pollMs ? 'Connection lost. Retrying…' : 'Connection lost. Reload the page to try again.');
      }
      if (pollMs) await sleep(pollMs);
    } while (pollMs && !finished);
  }

  // Handles one event about this tab's job, however it arrived (its own stream, or the shared
  // stream through the leader tab). Returns true when the job has ended here.
  function handle(name, data) {
    if (finished) return true;
    if (name === 'progress') {
      showProgress(data.percent, data.message);
    } else if (data.status === 'connect') {
      if (root.dataset.state !== 'progress') show('connected', 'Connected. Waiting for the job to finish…');
    } else if (data.status === 'unknown') {
      unknownJob();
    } else if (ENDINGS.has(data.status)) {
      moveTo(data.status, data.moveUrl);
    }
    return finished;
  }

  // Opens an EventSource on `url` and hands every event to onEvent(name, data, raw). When the
  // server refuses the stream, onRefused runs and nothing reconnects by itself.
  function openStream(url, onEvent, onRefused) {
    const source = new EventSource(url);
    for (const name of ['result', 'progress']) {
      source.addEventListener(name, (e) => {
        const data = parse(e.data);
        if (data) onEvent(name, data, e.data);
      });
    }
    source.addEventListener('error', () => {
      if (finished) return;
      if (source.readyState === EventSource.CONNECTING) {
        // The stream rotated or the network blinked: the browser reconnects after `retry`.
        show('reconnecting', 'Reconnecting…');
        return;
      }
      onRefused();
    });
    return source;
  }

  // This tab's own stream on /sse/connect/ID. Refused, it finds out whether the job exists, then
  // tries again later.
  function listen() {
    if (finished) return;
    const onEvent = (name, data) => handle(name, data) && source.close();
    const source = openStream(streamUrl, onEvent, async () => {
      show('reconnecting', 'The server is unavailable. Retrying…');
      await check().catch(() => {});
      await sleep(RETRY_MS);
      listen();
    });
  }

  // The leader's streams on /sse/watch, for every waiting tab's job, maxWatched jobs a stream.
  // Every (re)open reads the stored status of each job, so nothing is lost between the old
  // streams and the new ones.
  class SharedStreams {
    constructor(onEvent, onRefused) {
      this.onEvent = onEvent;
      this.onRefused = onRefused;
      this.tabs = new Map(); // tab → job id, as the other tabs announced them
      this.sources = [];
      this.timer = null;
      this.refusals = 0;
    }

    join(tab, id) {
      if (!JOB_ID.test(id) || this.tabs.get(tab) === id) return;
      this.tabs.set(tab, id);
      this.reopenIn(REOPEN_MS);
    }

    leave(tab) {
      if (this.tabs.delete(tab)) this.reopenIn(REOPEN_MS);
    }

    reopenIn(ms) {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.reopen(), ms);
    }

    reopen() {
      this.closeSources();
      const ids = new Set(this.tabs.values());
      if (!finished) ids.add(jobId);
      const sorted = [...ids].sort();
      for (let i = 0; i < sorted.length; i += maxWatched) {
        const list = sorted.slice(i, i + maxWatched).map(encodeURIComponent).join(',');
        const onEvent = (name, data, raw) => {
          this.refusals = 0;
          this.onEvent(name, data, raw);
        };
        this.sources.push(openStream(`/sse/watch?ids=${list}`, onEvent, () => this.refused()));
      }
    }

    // The server refused a stream (busy, or a cap): try again later, later each time.
    refused() {
      this.closeSources();
      this.refusals += 1;
      this.onRefused();
      const wait = Math.min(RETRY_MS * 2 ** (this.refusals - 1), RETRY_MAX_MS);
      this.reopenIn(wait * (0.75 + Math.random() / 2));
    }

    closeSources() {
      for (const source of this.sources) source.close();
      this.sources = [];
    }

    close() {
      clearTimeout(this.timer);
      this.closeSources();
    }
  }

  // Leader election among the tabs of this origin, in two strategies of one shape. Each calls
  // lead() when this tab becomes the leader and stepDown() when it no longer is, and returns
  // resign() (leave the election; a leader hands over at once) and rejoin() (stand again, back
  // from the back/forward cache).

  // Web Locks, where the page is a secure context. The lock is held for the life of the page or
  // until resign(): then the browser grants it to the next tab at once, even when the leader's
  // tab crashed. Where locks are refused (a sandboxed frame, storage blocked), refused() runs.
  function electByLock({ lead, stepDown, refused }) {
    let candidate = true;
    let asking = false;
    let release = null;
    const ask = async () => {
      if (asking || release) return;
      asking = true;
      try {
        await navigator.locks.request('handoff:leader', () => {
          asking = false;
          if (!candidate) return null;
          lead();
          return new Promise((resolve) => (release = resolve));
        });
      } catch {
        refused();
      } finally {
        asking = false;
      }
    };
    ask();
    return {
      resign() {
        candidate = false;
        if (!release) return;
        stepDown();
        release();
        release = null;
      },
      rejoin() {
        candidate = true;
        ask();
      },
    };
  }

  // Heartbeats on the channel, where Web Locks do not exist (plain HTTP on a real host, where
  // sharing matters most). The leader beats every HEARTBEAT_MS. A tab that has heard no leader
  // for LEADER_LOST_MS asks (a message reaches a background tab at once, while its timers may be
  // slowed to one a second or less) and takes over only when no leader answers within
  // ANSWER_MS. Of two leaders, the one with the smaller id stays.
  function electByHeartbeat(channel, me, { lead, stepDown }) {
    const HEARTBEAT_MS = 500;
    const LEADER_LOST_MS = 3000;
    const ANSWER_MS = 250;
    let candidate = true;
    let leading = false;
    let heardAt = 0;
    let asking = null;
    const beat = () => channel.postMessage({ type: Msg.LEADER, tab: me });
    const claim = () => {
      asking = null;
      if (candidate && !leading && Date.now() - heardAt > ANSWER_MS) {
        leading = true;
        lead();
      }
      if (leading) beat();
    };
    const ask = () => {
      if (asking || !candidate || leading) return;
      channel.postMessage({ type: Msg.LEADS });
      asking = setTimeout(claim, ANSWER_MS);
    };
    channel.addEventListener('message', ({ data: m }) => {
      switch (m?.type) {
        case Msg.LEADER:
          heardAt = Date.now();
          if (leading && m.tab < me) {
            leading = false;
            stepDown();
          }
          break;
        case Msg.LEADS:
          if (leading) beat();
          break;
        case Msg.RESIGN:
          heardAt = 0;
          setTimeout(ask, Math.random() * 100);
          break;
      }
    });
    setInterval(() => {
      if (leading) beat();
      else if (Date.now() - heardAt > LEADER_LOST_MS) ask();
    }, HEARTBEAT_MS);
    ask();
    return {
      resign() {
        candidate = false;
        if (!leading) return;
        leading = false;
        stepDown();
        channel.postMessage({ type: Msg.RESIGN, tab: me });
      },
      rejoin() {
        candidate = true;
      },
    };
  }

  // One stream per browser: the tabs of this origin elect a leader, which alone holds the shared
  // streams and passes each event on over the channel; each tab keeps the events about its job.
  // Anything that keeps the tab from sharing falls back to its own stream.
  function share() {
    let channel;
    try { channel = new BroadcastChannel('handoff'); } catch { return listen(); }
    const me = Math.random().toString(36).slice(2) + Date.now().toString(36);
    const post = (message) => channel.postMessage(message);
    const hello = () => post({ type: Msg.HELLO, tab: me, id: jobId });
    let streams = null; // while this tab leads

    const isMine = (data) =>
      data.status === 'connect' ? Array.isArray(data.ids) && data.ids.includes(jobId) : data.id === jobId;
    const take = (name, data) => {
      if (isMine(data) && handle(name, data)) retire();
    };

    const role = {
      lead() {
        if (streams) return;
        root.dataset.handoffLeader = 'yes';
        const pass = (name, data, raw) => {
          post({ type: Msg.EVENT, name, data: raw });
          take(name, data);
        };
        const refused = () => {
          if (!finished) show('reconnecting', 'The server is unavailable. Retrying…');
        };
        streams = new SharedStreams(pass, refused);
        // Every tab says which job it waits for; the streams open once they have answered.
        post({ type: Msg.WHO });
        streams.reopenIn(REOPEN_MS);
      },
      stepDown() {
        root.dataset.handoffLeader = 'no';
        streams?.close();
        streams = null;
      },
      refused() {
        removeEventListener('pagehide', retire);
        removeEventListener('pageshow', back);
        post({ type: Msg.BYE, tab: me });
        channel.close();
        listen();
      },
    };
    const locks = typeof navigator.locks?.request === 'function';
    const election = locks ? electByLock(role) : electByHeartbeat(channel, me, role);

    // This tab's own job has ended (or does not exist), or the tab is going: it needs no more
    // events, and if it leads, another tab takes over.
    function retire() {
      post({ type: Msg.BYE, tab: me });
      election.resign();
    }

    // Back from the back/forward cache: join again.
    function back(e) {
      if (!e.persisted || finished) return;
      hello();
      election.rejoin();
    }

    channel.addEventListener('message', ({ data: m }) => {
      switch (m?.type) {
        case Msg.EVENT: {
          const data = parse(m.data);
          if (data) take(m.name, data);
          break;
        }
        case Msg.WHO:
          if (!finished) hello();
          break;
        case Msg.HELLO:
          streams?.join(m.tab, m.id);
          break;
        case Msg.BYE:
          streams?.leave(m.tab);
          break;
      }
    });
    addEventListener('pagehide', retire);
    addEventListener('pageshow', back);
    hello();
  }

  // A page that names its own stream (data-handoff-stream) listens there alone: the shared stream
  // is Handoff's /sse/watch. So does one that does not say how many jobs a shared stream watches.
  const sharing =
    root.dataset.handoffShared !== 'off' &&
    !('handoffStream' in root.dataset) &&
    maxWatched !== null &&
    JOB_ID.test(jobId) &&
    typeof window.BroadcastChannel === 'function';

  show('connecting', 'Connecting…');
  if (typeof window.EventSource !== 'function') poll();
  else if (sharing) share();
  else listen();
})();
