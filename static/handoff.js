// Handoff client for page A. Include it on any page that has an element
//   <div data-handoff-job="JOB_ID"> … <p data-handoff-status></p> … </div>
// and, optionally, a <progress data-handoff-progress> bar and a <p data-handoff-message>.
// It listens on /sse/connect/JOB_ID: `event: progress` moves the bar; `event: result` with status
// `result`, `failed` or `expired` moves the tab to data.moveUrl. Without EventSource it polls
// /api/jobs/JOB_ID every 2 s. No inline script needed.
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

  // One stream per browser: the tabs of this origin elect a leader, which alone holds an
  // EventSource, on /sse/watch?ids= with every open tab's job, and passes each event on over a
  // BroadcastChannel. Leader election uses Web Locks where the page is a secure context; elsewhere
  // (plain HTTP on a real host, where sharing matters most) heartbeats on the same channel.
  function share() {
    var jobId = root.getAttribute('data-handoff-job');
    var me = Math.random().toString(36).slice(2) + Date.now().toString(36);
    var channel = new BroadcastChannel('handoff');
    var leading = false;
    var source = null;
    var tabs = {};           // tab → job id, as the other tabs announced them (the leader's view)
    var reopenTimer = null;
    var releaseLock = null;
    var heartbeats = null;
    var REOPEN_MS = 150;

    function post(message) { channel.postMessage(message); }

    function isMine(data) {
      if (data.status === 'connect') return !!data.ids && data.ids.indexOf(jobId) >= 0;
      return data.id === jobId;
    }

    // This tab's own job has ended (or does not exist): it needs no more events, and if it
    // leads, another tab takes over.
    function retire() {
      post({ type: 'bye', tab: me });
      if (!leading) return;
      stepDown();
      if (releaseLock) releaseLock();
      else post({ type: 'resign', tab: me });
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

    // (Re)opens the shared stream with the current set of jobs; every open reads the stored
    // status of each, so nothing is lost between the old stream and the new one.
    function reopen() {
      reopenTimer = null;
      if (!leading) return;
      if (source) { source.close(); source = null; }
      var ids = watchedIds();
      if (!ids.length) return;
      source = openStream('/sse/watch?ids=' + ids.map(encodeURIComponent).join(','), function (name, data, raw) {
        post({ type: 'event', name: name, data: raw });
        take(name, data);
      }, function () {
        source = null;
        if (!finished) show('reconnecting', 'The server is unavailable. Retrying…');
        setTimeout(reopen, RETRY_MS);
      });
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
      // Every tab says which job it waits for; the stream opens once they have answered.
      post({ type: 'who' });
      reopenSoon();
    }

    function stepDown() {
      leading = false;
      root.setAttribute('data-handoff-leader', 'no');
      if (reopenTimer) { clearTimeout(reopenTimer); reopenTimer = null; }
      if (source) { source.close(); source = null; }
    }

    channel.onmessage = function (e) {
      var m = e.data || {};
      if (m.type === 'event') {
        var data = parse(m.data);
        if (data) take(m.name, data);
      } else if (m.type === 'who') {
        if (!finished) post({ type: 'hello', tab: me, id: jobId });
      } else if (m.type === 'hello') {
        if (leading && tabs[m.tab] !== m.id) { tabs[m.tab] = m.id; reopenSoon(); }
      } else if (m.type === 'bye') {
        if (leading && tabs[m.tab]) { delete tabs[m.tab]; reopenSoon(); }
      } else if (heartbeats) {
        heartbeats(m);
      }
    };

    window.addEventListener('pagehide', retire);

    if (navigator.locks && typeof navigator.locks.request === 'function') {
      // Held for the life of the page, or until this tab's job ends: then the browser grants it
      // to the next tab at once, even when the leader's tab crashed.
      navigator.locks.request('handoff:leader', function () {
        if (finished) return null;
        lead();
        return new Promise(function (resolve) { releaseLock = resolve; });
      });
    } else {
      // Without Web Locks: the leader says so every HEARTBEAT_MS; a tab that hears no leader
      // for LEADER_LOST_MS takes over, and of two leaders the one with the smaller id stays.
      var HEARTBEAT_MS = 500;
      var LEADER_LOST_MS = 1500;
      var FIRST_LOOK_MS = 250;
      // A leader answers `leads?` at once; with none, this tab leads after FIRST_LOOK_MS.
      var heardAt = Date.now() - LEADER_LOST_MS + FIRST_LOOK_MS;
      var tick = function () {
        if (finished) return;
        if (!leading && Date.now() - heardAt > LEADER_LOST_MS) lead();
        if (leading) post({ type: 'leader', tab: me });
      };
      heartbeats = function (m) {
        if (m.type === 'leader') {
          heardAt = Date.now();
          if (leading && m.tab < me) stepDown();
        } else if (m.type === 'leads?') {
          if (leading) post({ type: 'leader', tab: me });
        } else if (m.type === 'resign') {
          heardAt = 0;
          setTimeout(tick, Math.random() * 100);
        }
      };
      post({ type: 'leads?' });
      setTimeout(tick, FIRST_LOOK_MS + 10);
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
