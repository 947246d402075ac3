/* Shared by the app's pages: the status line, the service's URLs (with the demo's `now`),
 * the clinician's token as the Authorization header, and an OperationOutcome's message. */
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
    try {
      const body = await response.json();
      const issue = (body.issue || [])[0] || {};
      return issue.diagnostics || response.statusText;
    } catch (e) {
      return response.statusText || String(response.status);
    }
  }

  return { setStatus, serviceUrl, headers, problem };
})();
