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

  function listen() {
    if (finished) return;
    var source = new EventSource(streamUrl);
    source.addEventListener('result', function (e) {
      var data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      if (data.status === 'connect') {
        if (root.getAttribute('data-state') !== 'progress') {
          show('connected', 'Connected. Waiting for the job to finish…');
        }
      } else if (ENDINGS[data.status]) {
        source.close();
        moveTo(data.status, data.moveUrl);
      }
    });
    source.addEventListener('progress', function (e) {
      var data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      showProgress(data.percent, data.message);
    });
    source.addEventListener('error', function () {
      if (finished) return;
      if (source.readyState === EventSource.CONNECTING) {
        // The stream rotated or the network blinked: the browser reconnects after `retry`.
        show('reconnecting', 'Reconnecting…');
        return;
      }
      // The server refused the stream: find out whether the job exists, then try again later.
      source.close();
      show('reconnecting', 'The server is unavailable. Retrying…');
      check(function () { setTimeout(listen, RETRY_MS); }, function () { setTimeout(listen, RETRY_MS); });
    });
  }

  show('connecting', 'Connecting…');
  if (typeof window.EventSource === 'function') listen(); else poll();
})();
