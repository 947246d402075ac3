/* SMART App Launch 2 (EHR launch with `iss` and `launch`, or standalone with `iss`), with PKCE;
 * an open FHIR server for development with `fhirServiceUrl` and `patientId`. The OAuth flow is
 * the fhirclient library's; this file only passes it the deployment's client id and scopes. */
"use strict";
(async function () {
  const status = document.getElementById("status");
  try {
    const response = await fetch("config.json", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error("the app's settings could not be read");
    const config = await response.json();
    const params = new URLSearchParams(window.location.search);
    let scope = config.scope;
    // An EHR launch asks for the `launch` scope, which binds the token to the EHR's context.
    if (params.get("launch") && !scope.split(" ").includes("launch")) scope = "launch " + scope;
    // A development aid: assess as of another date (`now=YYYY-MM-DD`), kept for the app page.
    const now = params.get("now");
    if (now) sessionStorage.setItem("fhir-dm-now", now);
    else sessionStorage.removeItem("fhir-dm-now");
    await FHIR.oauth2.authorize({
      clientId: config.clientId,
      scope: scope,
      redirectUri: new URL("./", window.location.href).pathname,
      pkceMode: "ifSupported",
      completeInTarget: true,
    });
  } catch (error) {
    status.textContent = "The app could not be launched: " + error.message;
    status.setAttribute("role", "alert");
  }
})();
