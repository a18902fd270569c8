// Rebound console: live job progress over server-sent events. The server
// renders the fragment; this file only swaps it in. No inline script: the
// Content-Security-Policy allows scripts from /static only.
(function () {
  document.querySelectorAll('[data-sse]').forEach(function (el) {
    if (!window.EventSource) return;
    var es = new EventSource(el.getAttribute('data-sse'));
    es.addEventListener('update', function (e) {
      el.innerHTML = e.data;
      el.setAttribute('data-updates', String(Number(el.getAttribute('data-updates') || 0) + 1));
    });
    es.addEventListener('end', function () { es.close(); el.setAttribute('data-ended', 'true'); });
    es.onerror = function () { if (el.getAttribute('data-ended')) es.close(); };
  });
})();
