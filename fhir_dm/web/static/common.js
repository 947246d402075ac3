/* Shared by the app's pages: the status line, the service's URLs (with the demo's `now`),
 * the clinician's token as the Authorization header, an OperationOutcome's message, and a
 * plain notice with a re-launch link when the service refuses the token (401/403). */
"use strict";
window.FhirDm = (function () {
  function setStatus(text, alert) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.hidden = !text;
    el.setAttribute("role", alert ? "alert" : "status");
  }

  function serviceUrl(path) {
    const url = new URL(path, new URL("../", window.location.href));
    const now = sessionStorage.getItem("fhir-dm-now");
    if (now) url.searchParams.set("now", now);
    return url;
  }

  function headers(smart) {
    const h = { Accept: "application/json" };
    const token = smart && smart.state.tokenResponse && smart.state.tokenResponse.access_token;
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  async function problem(response) {
    let text;
    try {
      const body = await response.json();
      const issue = (body.issue || [])[0] || {};
      text = issue.diagnostics || response.statusText;
    } catch (e) {
      text = response.statusText || String(response.status);
    }
    if (response.status === 401 || response.status === 403) tokenProblem(response.status, text);
    return text;
  }

  /* The launch page again, on the FHIR server of this session (fhirclient keeps its state in
   * sessionStorage under SMART_KEY), keeping the demo's `now`. */
  function launchUrl() {
    const url = new URL("launch", window.location.href);
    try {
      const key = JSON.parse(sessionStorage.getItem("SMART_KEY"));
      const state = key && JSON.parse(sessionStorage.getItem(key));
      if (state && state.serverUrl) url.searchParams.set("iss", state.serverUrl);
    } catch (e) {
      /* no session: the launch page asks for one */
    }
    const now = sessionStorage.getItem("fhir-dm-now");
    if (now) url.searchParams.set("now", now);
    return url.href;
  }

  /* A refused token (401: expired, revoked, not accepted; 403: scopes or patient not allowed)
   * is said plainly, above everything else, with a link to launch the app again. */
  function tokenProblem(status, text) {
    let box = document.getElementById("token-problem");
    if (!box) {
      box = document.createElement("div");
      box.id = "token-problem";
      box.className = "token-problem";
      box.setAttribute("role", "alert");
      const main = document.querySelector("main") || document.body;
      main.prepend(box);
    }
    box.dataset.status = String(status);
    const message = document.createElement("p");
    message.textContent = status === 401
      ? "Your access to the record has expired or was not accepted (" + text + "). Launch the app again to continue."
      : "Your access does not allow this (" + text + "). Launch the app again from the EHR with the access it needs.";
    const link = document.createElement("a");
    link.id = "relaunch";
    link.href = launchUrl();
    link.textContent = "Launch the app again";
    box.replaceChildren(message, link);
    box.hidden = false;
  }

  return { setStatus, serviceUrl, headers, problem, tokenProblem };
})();
