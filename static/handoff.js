// Handoff client for page A. Include it on any page that has an element
//   <div data-handoff-job="JOB_ID"> … <p data-handoff-status></p> … </div>
// and, optionally, a <progress data-handoff-progress> bar and a <p data-handoff-message>.
// The tabs of a browser share one stream, /sse/watch?ids=…, held by a leader tab (see share());
// alone, a tab listens on /sse/connect/JOB_ID. `event: progress` moves the bar; `event: result`
// with status `result`, `failed` or `expired` moves the tab to data.moveUrl. Without EventSource
// it polls /api/jobs/JOB_ID every 2 s. No inline script needed.
(function () {
  'use strict';

  var root = document.querySelector('[data-handoff-job]');
  if (!root) return;
  var id = encodeURIComponent(root.getAttribute('data-handoff-job'));
  var streamUrl = root.getAttribute('data-handoff-stream') || '/sse/connect/' + id;
  var apiUrl = root.getAttribute('data-handoff-api') || '/api/jobs/' + id;
  var statusEl = root.querySelector('[data-handoff-status]');
  var bar = root.querySelector('[data-handoff-progress]');
  var messageEl = root.querySelector('[data-handoff-message]');
  var POLL_MS = 2000;
  var JOB_ID = /^[A-Za-z0-9_-]{22}$/;
  var RETRY_MS = 3000;
  var finished = false;

  function show(state, text) {
    root.setAttribute('data-state', state);
    if (statusEl) statusEl.textContent = text;
  }

  // Only addresses on this page's own origin are followed, whatever the server says: the URL is
  // resolved as the browser would resolve it (which strips tabs and newlines, and reads a
  // backslash as a slash), and its origin compared.
  function sameOrigin(url) {
    if (typeof url !== 'string' || url.charAt(0) !== '/') return null;
    try {
      var resolved = new URL(url, window.location.href);
      return resolved.origin === window.location.origin ? resolved.href : null;
    } catch (err) {
      return null;
    }
  }

  // Shows a progress report: a percent fills the bar, none leaves it indeterminate.
  function showProgress(percent, message) {
    if (bar) {
      if (typeof percent === 'number') {
        bar.max = 100;
        bar.value = percent;
        bar.textContent = Math.round(percent) + ' %';
        bar.setAttribute('aria-valuetext', Math.round(percent) + ' %' + (message ? ', ' + message : ''));
      } else {
        bar.removeAttribute('value');
        bar.textContent = '';
      }
    }
    if (messageEl) messageEl.textContent = message || '';
    if (typeof percent === 'number') {
      show('progress', 'Working on it: ' + Math.round(percent) + ' %');
    }
  }

  var ENDINGS = {
    result: ['done', 'Done. Taking you to the result…'],
    complete: ['done', 'Done. Taking you to the result…'],
    failed: ['failed', 'The job failed. Taking you to the details…'],
    expired: ['expired', 'The job took too long. Taking you to the details…']
  };

  // Ends the wait: `status` is the event's (result, failed, expired) or the API's (complete, …).
  function moveTo(status, url) {
    if (finished) return;
    finished = true;
    var target = sameOrigin(url);
    if (!target) {
      show('invalid', 'The job ended, but its result address is not valid.');
      return;
    }
    var ending = ENDINGS[status] || ENDINGS.result;
    show(ending[0], ending[1]);
    window.location.assign(target);
  }

  function unknownJob() {
    finished = true;
    show('unknown', 'This job does not exist. The link may be mistyped, or the job has expired.');
  }

  // Asks the JSON API about the job; calls onPending when it is still running.
  function check(onPending, onTrouble) {
    fetch(apiUrl, { headers: { Accept: 'application/json' }, cache: 'no-store' })
      .then(function (r) {
        if (r.status === 404 || r.status === 400) { unknownJob(); return null; }
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.json();
      })
      .then(function (job) {
        if (!job) return;
        if (ENDINGS[job.status]) { moveTo(job.status, job.moveUrl); return; }
        if (job.progress) showProgress(job.progress.percent, job.progress.message);
        onPending();
      })
      .catch(onTrouble);
  }

  function poll() {
    if (finished) return;
    check(function () {
      show('polling', 'Waiting for the job to finish (checking every 2 s)…');
      setTimeout(poll, POLL_MS);
    }, function () {
      show('reconnecting', 'Connection lost. Retrying…');
      setTimeout(poll, POLL_MS);
    });
  }

  // Handles one event about this tab's job, however it arrived (its own stream, or the shared
  // stream through the leader tab). Returns true when the job has ended here.
  function handle(name, data) {
    if (finished) return true;
    if (name === 'progress') {
      showProgress(data.percent, data.message);
    } else if (data.status === 'connect') {
      if (root.getAttribute('data-state') !== 'progress') {
        show('connected', 'Connected. Waiting for the job to finish…');
      }
    } else if (data.status === 'unknown') {
      unknownJob();
    } else if (ENDINGS[data.status]) {
      moveTo(data.status, data.moveUrl);
    }
    return finished;
  }

  function parse(text) {
    try { return JSON.parse(text); } catch (err) { return null; }
  }

  // Opens an EventSource on `url` and hands every event to onEvent(name, data). When the server
  // refuses the stream, onRefused runs and nothing reconnects by itself.
  function openStream(url, onEvent, onRefused) {
    var source = new EventSource(url);
    ['result', 'progress'].forEach(function (name) {
      source.addEventListener(name, function (e) {
        var data = parse(e.data);
        if (data) onEvent(name, data, e.data);
      });
    });
    source.addEventListener('error', function () {
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

  // This tab's own stream on /sse/connect/ID.
  function listen() {
    if (finished) return;
    var source = openStream(streamUrl, function (name, data) {
      if (handle(name, data)) source.close();
    }, function () {
      // The server refused the stream: find out whether the job exists, then try again later.
      show('reconnecting', 'The server is unavailable. Retrying…');
      check(function () { setTimeout(listen, RETRY_MS); }, function () { setTimeout(listen, RETRY_MS); });
    });
  }

  // One stream per browser: the tabs of this origin elect a leader, which alone holds the
  // EventSource on /sse/watch?ids= with every open tab's job (one per 32 jobs), and passes each
  // event on over a BroadcastChannel. Leader election uses Web Locks where the page is a secure
  // context; elsewhere (plain HTTP on a real host, where sharing matters most) heartbeats on the
  // same channel. Anything that keeps the tab from sharing falls back to its own stream.
  function share() {
    var jobId = root.getAttribute('data-handoff-job');
    if (!JOB_ID.test(jobId)) { listen(); return; }
    var channel;
    try { channel = new BroadcastChannel('handoff'); } catch (err) { listen(); return; }
    var me = Math.random().toString(36).slice(2) + Date.now().toString(36);
    var leading = false;
    var sources = [];
    var tabs = {};           // tab → job id, as the other tabs announced them (the leader's view)
    var reopenTimer = null;
    var refusals = 0;
    var releaseLock = null;
    var heartbeats = null;
    var REOPEN_MS = 150;
    var PER_STREAM = 32;     // the server's limit of jobs per shared stream

    function post(message) { channel.postMessage(message); }

    function isMine(data) {
      if (data.status === 'connect') return !!data.ids && data.ids.indexOf(jobId) >= 0;
      return data.id === jobId;
    }

    // This tab's own job has ended (or does not exist), or the tab is going: it needs no more
    // events, and if it leads, another tab takes over.
    function retire() {
      post({ type: 'bye', tab: me });
      if (!leading) return;
      stepDown();
      if (releaseLock) { releaseLock(); releaseLock = null; } else post({ type: 'resign', tab: me });
    }

    function take(name, data) {
      if (isMine(data) && handle(name, data)) retire();
    }

    function watchedIds() {
      var ids = {};
      if (!finished) ids[jobId] = true;
      Object.keys(tabs).forEach(function (tab) { ids[tabs[tab]] = true; });
      return Object.keys(ids).sort();
    }

    function closeAll() {
      sources.forEach(function (source) { source.close(); });
      sources = [];
    }

    // (Re)opens the shared streams with the current set of jobs; every open reads the stored
    // status of each, so nothing is lost between the old streams and the new ones.
    function reopen() {
      reopenTimer = null;
      if (!leading) return;
      closeAll();
      var ids = watchedIds();
      for (var i = 0; i < ids.length; i += PER_STREAM) {
        var url = '/sse/watch?ids=' + ids.slice(i, i + PER_STREAM).map(encodeURIComponent).join(',');
        sources.push(openStream(url, function (name, data, raw) {
          refusals = 0;
          post({ type: 'event', name: name, data: raw });
          take(name, data);
        }, refused));
      }
    }

    // The server refused a stream (busy, or a cap): try again later, later each time.
    function refused() {
      if (!leading) return;
      closeAll();
      refusals += 1;
      if (!finished) show('reconnecting', 'The server is unavailable. Retrying…');
      var wait = Math.min(RETRY_MS * Math.pow(2, refusals - 1), 30000);
      if (reopenTimer) clearTimeout(reopenTimer);
      reopenTimer = setTimeout(reopen, wait * (0.75 + Math.random() / 2));
    }

    function reopenSoon() {
      if (!leading) return;
      if (reopenTimer) clearTimeout(reopenTimer);
      reopenTimer = setTimeout(reopen, REOPEN_MS);
    }

    function lead() {
      if (leading || finished) return;
      leading = true;
      root.setAttribute('data-handoff-leader', 'yes');
      tabs = {};
      // Every tab says which job it waits for; the streams open once they have answered.
      post({ type: 'who' });
      reopenSoon();
    }

    function stepDown() {
      leading = false;
      root.setAttribute('data-handoff-leader', 'no');
      if (reopenTimer) { clearTimeout(reopenTimer); reopenTimer = null; }
      closeAll();
    }

    channel.onmessage = function (e) {
      var m = e.data || {};
      if (m.type === 'event') {
        var data = parse(m.data);
        if (data) take(m.name, data);
      } else if (m.type === 'who') {
        if (!finished) post({ type: 'hello', tab: me, id: jobId });
      } else if (m.type === 'hello') {
        if (leading && JOB_ID.test(m.id) && tabs[m.tab] !== m.id) { tabs[m.tab] = m.id; reopenSoon(); }
      } else if (m.type === 'bye') {
        if (leading && tabs[m.tab]) { delete tabs[m.tab]; reopenSoon(); }
      } else if (heartbeats) {
        heartbeats(m);
      }
    };

    var electByLock = !!(navigator.locks && typeof navigator.locks.request === 'function');
    // Held for the life of the page, or until this tab's job ends: then the browser grants it to
    // the next tab at once, even when the leader's tab crashed.
    function askForLock() {
      navigator.locks.request('handoff:leader', function () {
        if (finished) return null;
        lead();
        return new Promise(function (resolve) { releaseLock = resolve; });
      }).catch(function () {
        // Locks refused here (a sandboxed frame, storage blocked): this tab listens alone.
        retire();
        channel.close();
        listen();
      });
    }

    window.addEventListener('pagehide', retire);
    // Back from the back/forward cache: join again.
    window.addEventListener('pageshow', function (e) {
      if (!e.persisted || finished) return;
      post({ type: 'hello', tab: me, id: jobId });
      if (electByLock) askForLock();
    });

    if (electByLock) {
      askForLock();
    } else {
      // Without Web Locks: the leader says so every HEARTBEAT_MS. A tab that has heard no leader
      // for LEADER_LOST_MS asks (`leads?`: messages reach a background tab at once, while its
      // timers may be slowed to one a second or less) and takes over only when no leader answers
      // within ANSWER_MS. Of two leaders, the one with the smaller id stays.
      var HEARTBEAT_MS = 500;
      var LEADER_LOST_MS = 3000;
      var ANSWER_MS = 250;
      var heardAt = 0;
      var asking = null;
      var claim = function () {
        asking = null;
        if (!finished && !leading && Date.now() - heardAt > ANSWER_MS) lead();
        if (leading) post({ type: 'leader', tab: me });
      };
      var ask = function () {
        if (asking || finished || leading) return;
        post({ type: 'leads?' });
        asking = setTimeout(claim, ANSWER_MS);
      };
      var tick = function () {
        if (finished) return;
        if (leading) post({ type: 'leader', tab: me });
        else if (Date.now() - heardAt > LEADER_LOST_MS) ask();
      };
      heartbeats = function (m) {
        if (m.type === 'leader') {
          heardAt = Date.now();
          if (leading && m.tab < me) stepDown();
        } else if (m.type === 'leads?') {
          if (leading) post({ type: 'leader', tab: me });
        } else if (m.type === 'resign') {
          heardAt = 0;
          setTimeout(ask, Math.random() * 100);
        }
      };
      ask();
      setInterval(tick, HEARTBEAT_MS);
    }
    post({ type: 'hello', tab: me, id: jobId });
  }

  // A page that names its own stream (data-handoff-stream) listens there alone: the shared
  // stream is Handoff's /sse/watch.
  var sharing = root.getAttribute('data-handoff-shared') !== 'off' &&
    !root.hasAttribute('data-handoff-stream') &&
    typeof window.BroadcastChannel === 'function';

  show('connecting', 'Connecting…');
  if (typeof window.EventSource !== 'function') poll();
  else if (sharing) share();
  else listen();
})();
