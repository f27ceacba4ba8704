// The cluster dashboard: plain JavaScript, no build step, no dependency.
// Every value that comes from a node (ids, URLs, metadata, process names, errors) is inserted as text, never
// as HTML. The token lives in sessionStorage and travels as a bearer header; the change stream is read with
// fetch, because EventSource cannot send headers.

const PAGE_SIZE = 100;
const FEED_SIZE = 100;
const TOKEN_KEY = "promptise-asgi-token";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  scope: "open",
  nodes: new Map(), // node id -> {status, process_count}: enough for the summary, kept from the stream
  page: new Map(), // node id -> its entry of /cluster/nodes, for the page on screen
  rows: new Map(), // node id -> its <tr>, for the page on screen
  cursors: [null], // the `after` of each page up to the one on screen (server-side paging)
  next: null, // the `next` cursor of the page on screen
  total: 0,
  filter: "",
  generation: 0, // counts page requests: only the newest one's answer is drawn
  pending: null, // while a page request is out: node id -> the live changes it may predate
  failed: false, // the last page request failed: the next stream connection retries it
  reload: null, // a pending reload of the page (joins, leaves, health under a health filter), debounced
  selected: null,
  lastEventId: null,
};

// The page lives at <coordinator>/ui/; the API is one level up, wherever the coordinator is mounted.
const API = new URL("..", document.baseURI);

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// -- talking to the coordinator -------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  if (options.body !== undefined) headers.set("Content-Type", "application/json");
  const response = await fetch(new URL(path, API), { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    showLogin(state.token ? "That token was refused." : "");
    throw new Error("unauthorized");
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function parsePayload(text) {
  let payload;
  try {
    payload = JSON.parse(text || "{}");
  } catch (error) {
    throw new Error(`the payload is not JSON: ${error.message}`);
  }
  if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
    throw new Error("the payload must be a JSON object");
  }
  return payload;
}

// -- sign in -----------------------------------------------------------------------------------------------

function showLogin(message) {
  $("dashboard").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function start() {
  try {
    state.scope = (await json("cluster/access")).scope;
  } catch (error) {
    if (error.message !== "unauthorized") $("connection").textContent = `error: ${error.message}`;
    return;
  }
  $("login").hidden = true;
  $("dashboard").hidden = false;
  document.body.classList.toggle("read-only", state.scope === "read");
  $("scope").textContent = state.scope === "read" ? "read-only" : "";
  stream(); // its first message is a snapshot of the coordinator's table: nothing is polled to draw the page
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  start();
});

// -- the node table ---------------------------------------------------------------------------------------
// The table shows one page of `GET /cluster/nodes` (sorted, filtered and paged by the coordinator); the stream
// keeps the summary and the rows on screen current, and a join or a leave reloads the page.

function applySnapshot(status) {
  state.nodes = new Map(Object.entries(status.nodes || {}).map(([id, node]) => [id, summaryOf(node)]));
  renderSummary(status);
  loadPage();
}

function summaryOf(node) {
  return { status: node.status, process_count: node.process_count || 0 };
}

function renderSummary(status) {
  let healthy = 0;
  let processes = 0;
  for (const node of state.nodes.values()) {
    if (node.status === "healthy") {
      healthy += 1;
      processes += node.process_count || 0;
    }
  }
  $("total-nodes").textContent = state.nodes.size;
  $("healthy-nodes").textContent = healthy;
  $("unhealthy-nodes").textContent = state.nodes.size - healthy;
  $("total-processes").textContent = processes;
  const discovery = status && status.discovery;
  if (discovery) {
    $("discovery").hidden = discovery.ok;
    $("discovery").textContent = discovery.ok ? "" : `discovery unavailable: ${discovery.error}`;
  }
}

function health(node) {
  if (node.status === "healthy" && node.missed_check) return "healthy (missed check)";
  return node.status || "unknown";
}

function age(seconds) {
  if (!seconds) return "never";
  const ago = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (ago < 120) return `${ago} s ago`;
  if (ago < 7200) return `${Math.round(ago / 60)} min ago`;
  return `${Math.round(ago / 3600)} h ago`;
}

const HEALTH_WORDS = new Map([["healthy", "healthy"], ["unhealthy", "unhealthy"], ["unknown", "unknown"],
  ["missed check", "missed_check"], ["missed_check", "missed_check"]]);

function pageQuery(cursors) {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const after = cursors[cursors.length - 1];
  if (after !== null) query.set("after", after);
  // The box filters by id or metadata; a health word filters by health instead.
  const words = state.filter;
  if (HEALTH_WORDS.has(words)) query.set("health", HEALTH_WORDS.get(words));
  else if (words) query.set("q", words);
  return query;
}

// Load the page whose cursor stack is `cursors` (the one on screen by default). Only the newest request's
// answer is drawn, and the stack on screen changes only when its page arrives; changes that come from the
// stream while a request is out are applied to its answer, which may predate them.
async function loadPage(cursors = state.cursors) {
  clearTimeout(state.reload);
  state.reload = null;
  const mine = ++state.generation;
  state.pending = new Map();
  let page;
  try {
    page = await json(`cluster/nodes?${pageQuery(cursors)}`);
  } catch (error) {
    if (mine === state.generation) {
      state.pending = null;
      state.failed = true;
      $("page-info").textContent = `error: ${error.message}`;
    }
    return;
  }
  if (mine !== state.generation) return; // a newer request was sent meanwhile: its answer draws the page
  const missed = state.pending;
  state.pending = null;
  state.failed = false;
  if (!page.nodes.length && cursors.length > 1) {
    loadPage(cursors.slice(0, -1)); // this page emptied (its nodes left): show the one before
    return;
  }
  state.cursors = cursors;
  state.page = new Map(page.nodes.map((node) => [node.node_id, node]));
  for (const [id, fields] of missed) {
    if (fields === null) state.page.delete(id); // it left after the answer was made
    else if (state.page.has(id)) Object.assign(state.page.get(id), fields);
  }
  state.next = page.next;
  state.total = page.total;
  renderTable();
}

function scheduleReload() {
  if (state.reload === null) state.reload = setTimeout(() => loadPage(), 250);
}

function renderTable() {
  const rows = new Map();
  for (const [id, node] of state.page) rows.set(id, rowFor(id, node, state.rows.get(id)));
  state.rows = rows;
  document.querySelector("#nodes tbody").replaceChildren(...rows.values());
  const first = (state.cursors.length - 1) * PAGE_SIZE;
  const shown = state.page.size;
  const range = shown ? `${first + 1}-${first + shown}` : "0";
  let info;
  if (!state.filter) info = `${range} of ${state.total}`;
  else if (state.next === null) info = `${range} of ${first + shown}`;
  else info = `${range} matching, more follow`;
  $("page-info").textContent = info;
  $("previous").disabled = state.cursors.length === 1;
  $("next").disabled = state.next === null;
}

function rowFor(id, node, row) {
  if (!row) {
    row = element("tr");
    row.dataset.node = id;
    const button = element("button", id, "link");
    button.type = "button";
    button.addEventListener("click", () => select(id));
    const first = element("td");
    first.append(button);
    row.append(first, element("td"), element("td"), element("td"), element("td"), element("td"));
  }
  fillRow(row, node);
  return row;
}

function fillRow(row, node) {
  const cells = row.children;
  cells[1].textContent = node.url;
  cells[2].textContent = health(node);
  cells[2].className = `health ${node.status}${node.missed_check ? " missed" : ""}`;
  cells[3].textContent = node.status === "healthy" ? node.process_count : "-";
  cells[4].textContent = age(node.last_seen);
  cells[5].textContent = Object.entries(node.metadata || {}).map(([key, value]) => `${key}=${JSON.stringify(value)}`).join(" ");
}

function updateNode(id, fields) {
  const known = state.nodes.get(id) || { status: "unknown", process_count: 0 };
  state.nodes.set(id, { ...known, ...Object.fromEntries(Object.entries(fields).filter(([key]) => key in known)) });
  renderSummary(null);
  if (state.pending) state.pending.set(id, { ...(state.pending.get(id) || {}), ...fields });
  const node = state.page.get(id);
  if (node) {
    Object.assign(node, fields);
    fillRow(state.rows.get(id), node); // only the changed row is touched
  }
  // Under a health filter a node's health decides whether it is listed: ask the coordinator again.
  if (HEALTH_WORDS.has(state.filter) && ("status" in fields || "missed_check" in fields)) scheduleReload();
}

function addNode(id) {
  state.nodes.set(id, { status: "unknown", process_count: 0 });
  renderSummary(null);
  scheduleReload(); // the page decides whether it belongs on screen
}

function removeNode(id) {
  state.nodes.delete(id);
  renderSummary(null);
  if (state.pending) state.pending.set(id, null);
  const row = state.rows.get(id);
  if (row) {
    row.remove();
    state.rows.delete(id);
    state.page.delete(id);
  }
  scheduleReload(); // the next node moves up into the page, and the total and the cursors change
  if (state.selected === id) $("detail").hidden = true;
}

$("filter").addEventListener("input", () => {
  state.filter = $("filter").value.trim().toLowerCase();
  state.generation += 1; // an answer to the old filter is not drawn
  state.cursors = [null]; // a new filter starts at its first page, whatever loads it
  clearTimeout(state.reload);
  state.reload = setTimeout(() => loadPage(), 150); // one request once typing pauses, not one per key
});
$("previous").addEventListener("click", () => {
  if (state.cursors.length > 1) loadPage(state.cursors.slice(0, -1));
});
$("next").addEventListener("click", () => {
  if (state.next !== null) loadPage([...state.cursors, state.next]);
});
setInterval(() => {
  for (const [id, row] of state.rows) row.children[4].textContent = age(state.page.get(id)?.last_seen);
}, 5000);

// -- one node's processes ---------------------------------------------------------------------------------

async function select(id) {
  state.selected = id;
  $("detail").hidden = false;
  $("detail-title").textContent = `Node ${id}`;
  await refreshDetail();
}

async function refreshDetail() {
  const id = state.selected;
  if (!id) return;
  $("detail-error").textContent = "";
  let status;
  try {
    status = await json(`cluster/nodes/${encodeURIComponent(id)}/status`);
  } catch (error) {
    $("detail-error").textContent = `${id}: ${error.message}`;
    return;
  }
  if (state.selected !== id) return;
  const rows = Object.entries(status.processes || {}).map(([name, process]) => processRow(id, name, process));
  document.querySelector("#processes tbody").replaceChildren(...rows);
  const select = $("inject-process");
  const chosen = select.value;
  select.replaceChildren(...Object.keys(status.processes || {}).map((name) => element("option", name)));
  if (chosen) select.value = chosen;
}

function processRow(id, name, process) {
  const row = element("tr");
  row.dataset.process = name;
  const deadLetters = process.dead_letters ?? process.dead_letter_count ?? "-";
  const handled = process.events_handled ?? process.invocation_count ?? "-";
  for (const value of [name, process.state, process.queue_size, process.events_received ?? "-", handled,
    process.events_failed ?? "-", deadLetters, process.last_error || ""]) {
    row.append(element("td", value));
  }
  row.children[1].className = `state ${process.state}`;
  const actions = element("td", null, "control");
  for (const action of ["Start", "Stop", "Restart"]) {
    const button = element("button", action);
    button.type = "button";
    button.addEventListener("click", () => control(id, name, action.toLowerCase(), button));
    actions.append(button);
  }
  row.append(actions);
  return row;
}

async function control(id, name, action, button) {
  button.disabled = true;
  try {
    await json(`cluster/nodes/${encodeURIComponent(id)}/processes/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  } catch (error) {
    $("detail-error").textContent = `${action} ${name}: ${error.message}`;
  } finally {
    button.disabled = false;
  }
  await refreshDetail();
}

$("inject-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("inject-result");
  try {
    const payload = parsePayload($("inject-payload").value);
    const name = $("inject-process").value;
    const answer = await json(`cluster/nodes/${encodeURIComponent(state.selected)}/processes/${encodeURIComponent(name)}/event`,
      { method: "POST", body: JSON.stringify({ payload }) });
    result.textContent = `injected: ${answer.event_id}`;
    result.className = "";
  } catch (error) {
    result.textContent = error.message;
    result.className = "error";
  }
  await refreshDetail();
});

$("broadcast-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const result = $("broadcast-result");
  try {
    const payload = parsePayload($("broadcast-payload").value);
    const name = $("broadcast-process").value.trim();
    const answer = await json(`cluster/processes/${encodeURIComponent(name)}/event`,
      { method: "POST", body: JSON.stringify({ payload }) });
    const results = Object.entries(answer.results || {});
    const failed = results.filter(([, value]) => value.error);
    result.textContent = `${results.length - failed.length} of ${results.length} nodes accepted it` +
      failed.map(([id, value]) => `; ${id}: ${value.error}`).join("");
    result.className = failed.length ? "error" : "";
  } catch (error) {
    result.textContent = error.message;
    result.className = "error";
  }
});

// -- the live change stream -------------------------------------------------------------------------------

function setConnection(text, healthy) {
  const badge = $("connection");
  badge.textContent = text;
  badge.classList.toggle("down", !healthy);
}

function feed(change) {
  const list = $("feed");
  const item = element("li");
  item.append(element("span", new Date().toLocaleTimeString(), "time"), element("span", change.type, "type"),
    element("span", JSON.stringify(change.data), "data"));
  list.prepend(item);
  while (list.children.length > FEED_SIZE) list.lastChild.remove();
}

function apply(change) {
  const data = change.data;
  if (change.type === "snapshot") {
    applySnapshot(data);
    return;
  }
  feed(change);
  if (change.type === "node.joined") {
    addNode(data.node_id);
  } else if (change.type === "node.left") {
    removeNode(data.node_id);
  } else if (change.type === "node.health") {
    updateNode(data.node_id, {
      status: data.healthy ? "healthy" : "unhealthy",
      missed_check: data.missed_check,
      process_count: data.process_count,
      last_error: data.error || null,
      last_seen: data.healthy && !data.missed_check ? Date.now() / 1000 : state.page.get(data.node_id)?.last_seen,
    });
  } else if (change.type === "node.processes") {
    updateNode(data.node_id, { process_count: data.processes.length });
    if (state.selected === data.node_id) refreshDetail();
  }
}

// A minimal SSE reader: `id:`, `event:` and one `data:` line per message, comments ignored.
function parseEvents(buffer, onChange) {
  const blocks = buffer.split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let id = null;
    let type = "message";
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("event:")) type = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (id !== null && data) onChange({ id: Number(id), type, data: JSON.parse(data) });
  }
  return rest;
}

async function stream() {
  let pause = 500;
  for (;;) {
    try {
      const headers = state.lastEventId ? { "Last-Event-ID": String(state.lastEventId) } : {};
      const response = await api("cluster/changes", { headers });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setConnection("live", true);
      if (state.failed) loadPage(); // resumed without a snapshot: retry the page that failed to load
      pause = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, (change) => {
          state.lastEventId = change.id;
          apply(change);
        });
      }
    } catch (error) {
      if (error.message === "unauthorized") return;
    }
    setConnection("reconnecting", false);
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, 10000);
  }
}

start();
