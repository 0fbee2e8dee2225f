// filedock operator page: the colour scheme toggle and the live refresh switch.
// Loaded in <head> without `defer` so that a chosen scheme applies before the first
// paint; the rest waits for the document. The page works without this file.
(function () {
  "use strict";
  var root = document.documentElement;
  var KEY = "filedock-theme";
  var stored = null;
  try { stored = window.localStorage.getItem(KEY); } catch (e) { /* storage refused */ }
  if (stored === "light" || stored === "dark") { root.setAttribute("data-theme", stored); }

  function current() {
    var chosen = root.getAttribute("data-theme");
    if (chosen) { return chosen; }
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  document.addEventListener("DOMContentLoaded", function () {
    var toggle = document.getElementById("theme");
    if (toggle) {
      toggle.hidden = false;
      toggle.addEventListener("click", function () {
        var next = current() === "dark" ? "light" : "dark";
        root.setAttribute("data-theme", next);
        try { window.localStorage.setItem(KEY, next); } catch (e) { /* storage refused */ }
      });
    }
    var live = document.getElementById("live");
    if (live) {
      live.parentElement.hidden = false;
      live.addEventListener("change", function () {
        document.querySelector(".live .dot").classList.toggle("off", !live.checked);
      });
    }
    // A page refreshing itself every few seconds: not while hidden or switched off.
    document.body.addEventListener("htmx:beforeRequest", function (evt) {
      var elt = evt.detail && evt.detail.elt;
      if (elt && elt.id === "main" && (document.hidden || (live && !live.checked))) {
        evt.preventDefault();
      }
    });
  });
})();
