// Handoff client for page A. Include it on any page that has an element
//   <div data-handoff-job="JOB_ID"> … <p data-handoff-status></p> … </div>
// It listens on /sse/connect/JOB_ID for `event: result` and moves the tab to data.moveUrl when the
// job completes. Without EventSource it polls /api/jobs/JOB_ID every 2 s. No inline script needed.
(function () {
  'use strict';

  var root = document.querySelector('[data-handoff-job]');
  if (!root) return;
  var id = encodeURIComponent(root.getAttribute('data-handoff-job'));
  var streamUrl = root.getAttribute('data-handoff-stream') || '/sse/connect/' + id;
  var apiUrl = root.getAttribute('data-handoff-api') || '/api/jobs/' + id;
  var statusEl = root.querySelector('[data-handoff-status]');
  var POLL_MS = 2000;
  var RETRY_MS = 3000;
  var finished = false;

  function show(state, text) {
    root.setAttribute('data-state', state);
    if (statusEl) statusEl.textContent = text;
  }

  // Only same-origin paths are followed, whatever the server says.
  function isLocalPath(url) {
    return typeof url === 'string' && url.charAt(0) === '/' && url.charAt(1) !== '/' && url.indexOf('\\') < 0;
  }

  function moveTo(url) {
    if (finished) return;
    if (!isLocalPath(url)) {
      show('failed', 'The job finished, but its result address is not valid.');
      finished = true;
      return;
    }
    finished = true;
    show('done', 'Done. Taking you to the result…');
    window.location.assign(url);
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
        if (job.status === 'complete') moveTo(job.moveUrl); else onPending();
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
        show('connected', 'Connected. Waiting for the job to finish…');
      } else if (data.status === 'result') {
        source.close();
        moveTo(data.moveUrl);
      }
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
