// Collects errors (a browser test reads window.__errors), and refreshes
// the element with data-live from its URL every two seconds, without
// reloading the page.
window.__errors = [];
window.addEventListener("error", (event) => window.__errors.push(String(event.message)));
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); consoleError(...args); };
for (const live of document.querySelectorAll("[data-live]")) {
  const refresh = async () => {
    try {
      const response = await fetch(live.dataset.live, { credentials: "same-origin" });
      if (response.ok) live.innerHTML = await response.text();
    } catch (err) {
      // The distribuidor is restarting: the next tick tries again.
    }
  };
  setInterval(refresh, 2000);
}
