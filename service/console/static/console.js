// EditServe console: a thin page over the /v1 API, signed in with a session cookie.
// Every request goes through `api`, which sends the CSRF header on changes and turns an
// error body {error, type, field} into an ApiError whose message is shown beside the field.

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

const state = { csrf: null, methods: [], head: null, session: null };

class ApiError extends Error {
  constructor(status, message, field, type) {
    super(message);
    this.status = status;
    this.field = field;
    this.type = type;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.csrf && method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && (data.error?.message ?? data.error)) || `${response.status} ${text}`;
    const field = data && (data.field ?? data.error?.param ?? null);
    const error = new ApiError(response.status, String(message), field, data?.type);
    if (response.status === 401 && !path.startsWith("/console/session")) showSignIn();
    throw error;
  }
  return data;
}

// -- errors beside fields ------------------------------------------------------------------

function clearErrors(form) {
  $$(".field-error", form).forEach((p) => (p.textContent = ""));
  $$(".invalid", form).forEach((el) => el.classList.remove("invalid"));
}

// The API names fields by path ("edit.target_new", "hparams.layers.0"); the nearest named
// element takes the message, else the form's own error line.
function showError(form, error) {
  const field = error.field || "";
  const parts = field.split(".");
  for (let n = parts.length; n > 0; n--) {
    const name = parts.slice(0, n).join(".");
    const slot = $(`[data-error-for="${CSS.escape(name)}"]`, form);
    if (slot) {
      slot.textContent = error.message;
      $(`[data-field="${CSS.escape(name)}"]`, form)?.classList.add("invalid");
      return;
    }
  }
  const fallback = $('[data-error-for="_form"]', form);
  if (fallback) fallback.textContent = error.message;
  else alert(error.message);
}

async function submitting(form, work) {
  clearErrors(form);
  const button = $('button[type="submit"]', form);
  if (button) button.disabled = true;
  try {
    await work();
  } catch (error) {
    if (error instanceof ApiError) showError(form, error);
    else throw error;
  } finally {
    if (button) button.disabled = false;
  }
}

function confirmAction(text) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// -- session ---------------------------------------------------------------------------------

function showSignIn() {
  state.csrf = null;
  $("#app-view").hidden = true;
  $("#sign-out").hidden = true;
  $("#who").textContent = "";
  $("#sign-in-view").hidden = false;
  $("#api-key").focus();
}

async function start() {
  try {
    state.session = await api("GET", "/console/session");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return showSignIn();
    throw error;
  }
  state.csrf = state.session.csrf_token;
  $("#sign-in-view").hidden = true;
  $("#app-view").hidden = false;
  $("#sign-out").hidden = state.session.auth === "open";
  $("#who").textContent = `${state.session.key_name} (${state.session.scopes.join(", ")})`;
  await refreshModel();
  await loadMethodsWhenReady();
  showTab("edit");
}

// While the server starts (model loading, statistics) model routes answer 503: say so and
// try again, rather than leave an empty form.
async function loadMethodsWhenReady() {
  for (;;) {
    try {
      return await loadMethods();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 503) throw error;
      $("#model-line").textContent = `${error.message}; retrying…`;
      await new Promise((resolve) => setTimeout(resolve, 3000));
      await refreshModel();
    }
  }
}

$("#sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  submitting(form, async () => {
    await api("POST", "/console/session", { api_key: $("#api-key").value });
    $("#api-key").value = "";
    await start();
  });
});

$("#sign-out").addEventListener("click", async () => {
  await api("DELETE", "/console/session");
  showSignIn();
});

async function refreshModel() {
  try {
    const model = await api("GET", "/v1/model");
    state.head = model.version;
    $("#model-line").textContent =
      `${model.model} · version ${model.version} · ${model.live_edits} live edits · ${model.role}`;
    $("#model-line").dataset.version = String(model.version);
  } catch (error) {
    $("#model-line").textContent = error.message;
  }
}

// -- tabs --------------------------------------------------------------------------------------

const tabLoaders = {
  edit: async () => {},
  timeline: () => loadTimeline(),
  playground: async () => {
    if (state.head !== null && $("#play-version").value === "0") {
      $("#play-version").value = String(Math.max(0, state.head - 1));
    }
  },
  evaluations: () => loadEvaluations(),
};

function showTab(name) {
  for (const button of $$(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const section of $$(".tab")) section.hidden = section.id !== `tab-${name}`;
  return tabLoaders[name]();
}

$$(".tabs button").forEach((button) =>
  button.addEventListener("click", () => showTab(button.dataset.tab)),
);

// -- edit form, built from /v1/methods ------------------------------------------------------

async function loadMethods() {
  state.methods = await api("GET", "/v1/methods");
  for (const select of [$("#edit-method"), $("#eval-method")]) {
    select.replaceChildren(
      ...state.methods.map((m) => element("option", { value: m.name }, m.name)),
    );
    select.value = state.methods.some((m) => m.name === "rome") ? "rome" : state.methods[0].name;
  }
  renderHyperparameters();
}

function currentMethod() {
  return state.methods.find((m) => m.name === $("#edit-method").value);
}

function renderHyperparameters() {
  const method = currentMethod();
  const needs = [];
  if (method.needs_statistics) needs.push("key statistics (computed once per layer)");
  if (method.uses_history) needs.push("the patches before it");
  $("#method-needs").textContent = needs.length ? `Needs ${needs.join(" and ")}.` : "";
  $("#hparams-family").textContent = `(defaults for the ${method.family} family)`;
  const box = $("#hparams");
  box.replaceChildren();
  for (const hp of method.hyperparameters) {
    const id = `hp-${hp.name}`;
    const field = `hparams.${hp.name}`;
    const input = element("input", { id, "data-field": field, "data-hparam": hp.name });
    input.dataset.type = hp.type;
    if (hp.type === "bool") {
      input.type = "checkbox";
      input.checked = Boolean(hp.default);
    } else if (hp.type === "int" || hp.type === "float") {
      input.type = "number";
      input.step = hp.type === "float" ? "any" : "1";
      if (hp.maximum !== null && hp.maximum !== undefined) input.max = String(hp.maximum);
      input.value = hp.default === null ? "" : String(hp.default);
    } else {
      input.value = formatValue(hp.default);
      input.placeholder = hp.type;
    }
    input.dataset.default = input.type === "checkbox" ? String(input.checked) : input.value;
    const hint = hp.maximum !== null && hp.maximum !== undefined ? ` ≤ ${hp.maximum}` : "";
    box.append(
      element("label", { for: id }, `${hp.name} `, element("span", { className: "muted" }, `${hp.type}${hint}`)),
      element("div", {}, input, element("p", { className: "field-error", "data-error-for": field })),
    );
  }
}

function formatValue(value) {
  if (Array.isArray(value)) return value.join(", ");
  return value === null || value === undefined ? "" : String(value);
}

function parseValue(input) {
  const text = input.value.trim();
  const type = input.dataset.type;
  if (input.type === "checkbox") return input.checked;
  if (text === "" && type.includes("None")) return null;
  if (type === "int") return Number.parseInt(text, 10);
  if (type === "float") return Number(text);
  if (type.startsWith("list") || type.startsWith("tuple")) {
    const items = text === "" ? [] : text.split(",").map((item) => item.trim());
    return type.includes("int") ? items.map((item) => Number.parseInt(item, 10)) : items;
  }
  if (type.includes("int") && /^-?\d+$/.test(text)) return Number.parseInt(text, 10);
  if (type.includes("float") && text !== "" && !Number.isNaN(Number(text))) return Number(text);
  return text;
}

// Only what the user changed is sent: the server applies its own family defaults.
function changedHyperparameters() {
  const overrides = {};
  for (const input of $$("#hparams input")) {
    const now = input.type === "checkbox" ? String(input.checked) : input.value;
    if (now !== input.dataset.default) overrides[input.dataset.hparam] = parseValue(input);
  }
  return overrides;
}

$("#edit-method").addEventListener("change", renderHyperparameters);

$("#edit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  submitting(form, async () => {
    const paraphrases = $("#edit-paraphrases").value
      .split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    const body = {
      method: $("#edit-method").value,
      hparams: changedHyperparameters(),
      edit: {
        prompt: $("#edit-prompt").value,
        subject: $("#edit-subject").value,
        target_new: $("#edit-target").value,
        paraphrases,
      },
    };
    const accepted = await api("POST", "/v1/edits", body);
    watchJob(accepted.job_id, `Edit job ${accepted.job_id}`);
  });
});

// -- a job's progress, live over server-sent events ------------------------------------------

let watching = null;

function watchJob(jobId, title) {
  if (watching) watching.close();
  $("#edit-job").hidden = false;
  $("#edit-job").dataset.jobId = String(jobId);
  $("#edit-job").dataset.status = "queued";
  $("#edit-job-title").textContent = title;
  $("#edit-outcome").textContent = "";
  $("#edit-outcome").className = "";
  $("#edit-details").hidden = true;
  $("#edit-cancel").hidden = false;
  showProgress({ percent: 0, stage: "queued", status: "queued" });
  const source = new EventSource(`/v1/jobs/${jobId}/events`);
  watching = source;
  source.addEventListener("progress", (event) => showProgress(JSON.parse(event.data)));
  source.addEventListener("done", (event) => {
    source.close();
    finished(JSON.parse(event.data));
  });
  source.addEventListener("timeout", () => {
    source.close();
    watchJob(jobId, title); // the stream ends after the server's wait limit: reconnect
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) $("#edit-stage").textContent = "connection lost";
  };
}

function showProgress(job) {
  $("#edit-progress").value = job.percent;
  $("#edit-percent").textContent = `${Math.round(job.percent)} %`;
  $("#edit-stage").textContent = `${job.status}: ${job.stage}`;
  $("#edit-job").dataset.status = job.status;
}

async function finished(job) {
  showProgress(job);
  $("#edit-cancel").hidden = true;
  const outcome = $("#edit-outcome");
  if (job.status === "applied" || job.status === "completed") {
    outcome.textContent = `Applied: the model is at version ${job.result_version}.`;
    outcome.className = "ok";
  } else {
    outcome.textContent = `${job.status}: ${job.error ?? ""}`;
    outcome.className = "bad";
  }
  if (job.result) {
    $("#edit-details").textContent = JSON.stringify(job.result, null, 2);
    $("#edit-details").hidden = false;
  }
  await refreshModel();
}

$("#edit-cancel").addEventListener("click", async () => {
  const jobId = $("#edit-job").dataset.jobId;
  try {
    await api("POST", `/v1/jobs/${jobId}/cancel`);
  } catch (error) {
    $("#edit-stage").textContent = error.message;
  }
});

// -- timeline ------------------------------------------------------------------------------

function summarizeDiagnostics(edit) {
  const parts = [];
  const diagnostics = edit.diagnostics || {};
  for (const [key, value] of Object.entries(diagnostics)) {
    if (key === "guard" || typeof value === "object") continue;
    parts.push(`${key} ${typeof value === "number" ? Number(value.toPrecision(3)) : value}`);
  }
  const guard = diagnostics.guard;
  const text = [`${edit.method}: “${edit.request.prompt?.replace("{}", edit.request.subject)}” → ${edit.request.target_new}`];
  if (parts.length) text.push(parts.join(" · "));
  if (guard) {
    const verdict = guard.passed ? "passed" : `refused (${guard.reasons.join("; ")})`;
    const figures = Object.entries(guard.figures || {}).map(
      ([key, value]) => `${key} ${Number(Number(value).toPrecision(3))}`,
    );
    text.push(`guard ${verdict}${figures.length ? `: ${figures.join(" · ")}` : ""}`);
  }
  return text;
}

async function loadTimeline() {
  const [versions, edits] = await Promise.all([
    api("GET", "/v1/versions?limit=200"),
    api("GET", "/v1/edits?limit=500"),
  ]);
  await refreshModel();
  const byId = new Map(edits.edits.map((edit) => [edit.id, edit]));
  const body = $("#versions tbody");
  body.replaceChildren();
  for (const version of versions) {
    const diagnostics = element("td", { className: "diag" });
    for (const id of version.edit_ids) {
      const edit = byId.get(id);
      if (!edit) continue;
      for (const line of summarizeDiagnostics(edit)) diagnostics.append(element("div", {}, line));
    }
    if (version.note) diagnostics.append(element("div", {}, version.note));
    const actions = element("td", { className: "actions" });
    if (version.number !== state.head) {
      actions.append(
        element(
          "button",
          {
            type: "button",
            className: "danger",
            "data-rollback": String(version.number),
            onclick: () => rollback(version.number),
          },
          "Roll back to here",
        ),
      );
    }
    for (const id of version.edit_ids) {
      const edit = byId.get(id);
      if (edit?.live && version.kind === "edit") {
        actions.append(
          element(
            "button",
            { type: "button", className: "secondary", "data-revert": id, onclick: () => revert(id) },
            "Revert edit",
          ),
        );
      }
    }
    const row = element(
      "tr",
      { "data-version": String(version.number) },
      element("td", {}, String(version.number)),
      element("td", {}, version.kind),
      element("td", {}, String(version.edit_ids.length)),
      diagnostics,
      element("td", {}, new Date(version.created_at).toLocaleString()),
      actions,
    );
    if (version.number === state.head) row.className = "head-row";
    body.append(row);
  }
}

async function timelineAction(work) {
  const slot = $('[data-error-for="_timeline"]');
  slot.textContent = "";
  try {
    await work();
  } catch (error) {
    if (error instanceof ApiError) slot.textContent = error.message;
    else throw error;
  }
  await loadTimeline();
}

async function rollback(number) {
  if (!(await confirmAction(`Roll the model back to version ${number}? This records a new version with its weights.`))) return;
  await timelineAction(() => api("POST", "/v1/rollback", { to_version: number, wait: true }));
}

async function revert(editId) {
  if (!(await confirmAction(`Revert edit ${editId}? The edits after it are recomputed without it.`))) return;
  await timelineAction(() => api("POST", `/v1/edits/${editId}/revert`, { mode: "rebase", wait: true }));
}

// -- playground ----------------------------------------------------------------------------

$("#play-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  submitting(form, async () => {
    $("#play-head").textContent = "…";
    $("#play-other").textContent = "…";
    const prompt = $("#play-prompt").value;
    const parameters = { max_new_tokens: Number.parseInt($("#play-tokens").value, 10) };
    const versionText = $("#play-version").value.trim();
    const version = versionText === "" ? null : Number.parseInt(versionText, 10);
    const [head, other] = await Promise.all([
      api("POST", "/v1/generate", { inputs: prompt, parameters }),
      api("POST", "/v1/generate", { inputs: prompt, parameters, version }),
    ]).catch((error) => {
      $("#play-head").textContent = "";
      $("#play-other").textContent = "";
      throw error;
    });
    $("#play-head").textContent = head.generated_text;
    $("#play-head-version").textContent = `(${head.model_version})`;
    $("#play-other").textContent = other.generated_text;
    $("#play-other-version").textContent = `(${other.model_version})`;
  });
});

// -- evaluations ---------------------------------------------------------------------------

async function loadEvaluations() {
  const runs = await api("GET", "/v1/evaluations");
  const body = $("#evaluations tbody");
  body.replaceChildren(
    ...runs.map((run) =>
      element(
        "tr",
        { "data-evaluation": String(run.id) },
        element("td", {}, String(run.id)),
        element("td", {}, `${run.source.dataset ?? "cases"} ${run.source.split ?? ""} × ${run.cases}`),
        element("td", {}, run.status),
        element("td", {}, `${Math.round(run.percent)} % ${run.stage}`),
        element(
          "td",
          {},
          element("a", { href: run.report_url, target: "_blank", rel: "noopener" }, "report"),
          " · ",
          element("a", { href: run.csv_url }, "CSV"),
        ),
      ),
    ),
  );
  if (runs.some((run) => !run.finished_at)) setTimeout(refreshEvaluationsIfShown, 2000);
}

function refreshEvaluationsIfShown() {
  if (!$("#tab-evaluations").hidden) loadEvaluations();
}

$("#eval-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  submitting(form, async () => {
    await api("POST", "/v1/evaluations", {
      dataset: $("#eval-dataset").value,
      count: Number.parseInt($("#eval-count").value, 10),
      method: $("#eval-method").value,
    });
    await loadEvaluations();
  });
});

start();
