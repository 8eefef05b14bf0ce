/* Gantry chat: sets the colour theme before the first paint (saved choice, else the system's). */
(function () {
  var theme = null;
  try { theme = localStorage.getItem("gantry.theme"); } catch (e) { /* storage off: follow the system */ }
  if (theme !== "light" && theme !== "dark") {
    theme = window.matchMedia && matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  document.documentElement.setAttribute("data-theme", theme);
})();
