// The only way the console reaches the cluster: the public Kubernetes/KubeVirt API with a bearer token.
import { useEffect, useRef, useState } from 'react';

const TOKEN_KEY = 'virtplane-console-token';

export const getToken = () => sessionStorage.getItem(TOKEN_KEY) || '';
export const setToken = (t) => {
  rulesCache.clear(); // another user: other permissions
  return t ? sessionStorage.setItem(TOKEN_KEY, t) : sessionStorage.removeItem(TOKEN_KEY);
};

// A failed call, carrying the Kubernetes Status (code, reason, message, details.causes).
export class ApiError extends Error {
  constructor(code, status) {
    super((status && status.message) || `HTTP ${code}`);
    this.code = code;
    this.status = status || {};
    this.causes = (status && status.details && status.details.causes) || [];
  }
}

function headers(extra) {
  return { Authorization: `Bearer ${getToken()}`, Accept: 'application/json', ...extra };
}

export async function request(method, path, body, contentType = 'application/json') {
  const init = { method, headers: headers(body !== undefined ? { 'Content-Type': contentType } : {}) };
  if (body !== undefined) init.body = typeof body === 'string' ? body : JSON.stringify(body);
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { message: text };
  }
  if (!resp.ok) {
    if (resp.status === 401) loggedOut();
    throw new ApiError(resp.status, data);
  }
  return data;
}

// A token the server stops accepting (revoked, rotated) sends the user back to the login form.
const logoutListeners = new Set();
export const onLoggedOut = (fn) => { logoutListeners.add(fn); return () => logoutListeners.delete(fn); };
function loggedOut() {
  if (!getToken()) return;
  setToken('');
  for (const fn of logoutListeners) fn();
}

export const get = (path) => request('GET', path);
export const getText = async (path) => {
  const resp = await fetch(path, { headers: headers({ Accept: 'text/plain' }) });
  const text = await resp.text();
  if (!resp.ok) {
    let status = null;
    try { status = JSON.parse(text); } catch { status = { message: text }; }
    throw new ApiError(resp.status, status);
  }
  return text;
};

// Resource paths: group '' is the core API.
export function resourcePath({ group = '', version = 'v1', plural }, namespace, name, sub) {
  let p = group ? `/apis/${group}/${version}` : `/api/${version}`;
  if (namespace) p += `/namespaces/${encodeURIComponent(namespace)}`;
  p += `/${plural}`;
  if (name) p += `/${encodeURIComponent(name)}`;
  if (sub) p += `/${sub}`;
  return p;
}

export const R = {
  vms: { group: 'kubevirt.io', plural: 'virtualmachines' },
  vmis: { group: 'kubevirt.io', plural: 'virtualmachineinstances' },
  migrations: { group: 'kubevirt.io', plural: 'virtualmachineinstancemigrations' },
  namespaces: { plural: 'namespaces' },
  nodes: { plural: 'nodes' },
  pods: { plural: 'pods' },
  events: { plural: 'events' },
  pvcs: { plural: 'persistentvolumeclaims' },
  dataVolumes: { group: 'cdi.kubevirt.io', version: 'v1beta1', plural: 'datavolumes' },
  storageClasses: { group: 'storage.k8s.io', plural: 'storageclasses' },
  storageProfiles: { group: 'cdi.kubevirt.io', version: 'v1beta1', plural: 'storageprofiles' },
  deployments: { group: 'apps', plural: 'deployments' },
  clones: { group: 'clone.kubevirt.io', version: 'v1beta1', plural: 'virtualmachineclones' },
  nads: { group: 'k8s.cni.cncf.io', plural: 'network-attachment-definitions' },
  clusterInstancetypes: { group: 'instancetype.kubevirt.io', version: 'v1beta1', plural: 'virtualmachineclusterinstancetypes' },
  clusterPreferences: { group: 'instancetype.kubevirt.io', version: 'v1beta1', plural: 'virtualmachineclusterpreferences' },
};

export function vmAction(ns, name, action) {
  return request('PUT', `/apis/subresources.kubevirt.io/v1/namespaces/${ns}/virtualmachines/${name}/${action}`, {});
}

export const keyOf = (o) => `${o.metadata.namespace || ''}/${o.metadata.name}`;

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

// List, then watch from the list's resourceVersion; a 410 (history compacted) or a broken stream re-lists.
// Updates are batched so 1,000 objects changing at once cost one render, not 1,000.
async function listAndWatch(path, params, signal, onChange, onError) {
  let items = new Map();
  let pending = null;
  const flush = () => {
    pending = null;
    onChange(items);
  };
  const schedule = () => {
    if (!pending) pending = setTimeout(flush, 100);
  };
  let backoff = 500;
  while (!signal.aborted) {
    try {
      const list = await request('GET', path + query(params));
      items = new Map();
      for (const o of list.items || []) items.set(keyOf(o), o);
      flush();
      onError(null);
      let rv = list.metadata.resourceVersion;
      while (!signal.aborted) {
        const resp = await fetch(path + query({ ...params, watch: '1', resourceVersion: rv, allowWatchBookmarks: 'true' }),
          { headers: headers(), signal });
        if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        let expired = false;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (!line) continue;
            const ev = JSON.parse(line);
            if (ev.type === 'ERROR') {
              expired = true;
              break;
            }
            const obj = ev.object;
            if (obj && obj.metadata && obj.metadata.resourceVersion) rv = obj.metadata.resourceVersion;
            if (ev.type === 'BOOKMARK') continue;
            if (ev.type === 'DELETED') items.delete(keyOf(obj));
            else items.set(keyOf(obj), obj);
            schedule();
          }
          if (expired) break;
        }
        if (expired) break; // re-list
      }
      backoff = 500;
    } catch (e) {
      if (signal.aborted) return;
      onError(e);
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 10000);
    }
  }
}

// React hook: the live list of a resource (optionally in one namespace, with selectors).
export function useWatch(res, { namespace, fieldSelector, labelSelector, name } = {}) {
  const [state, setState] = useState({ items: [], loaded: false, error: null });
  const path = resourcePath(res, namespace);
  const fs = name ? `metadata.name=${name}` : fieldSelector;
  const cancel = useRef(null);
  useEffect(() => {
    const ctrl = new AbortController();
    cancel.current = ctrl;
    setState({ items: [], loaded: false, error: null });
    listAndWatch(path, { fieldSelector: fs, labelSelector }, ctrl.signal,
      (m) => setState((s) => ({ ...s, items: Array.from(m.values()), loaded: true })),
      (e) => setState((s) => ({ ...s, error: e })));
    return () => ctrl.abort();
  }, [path, fs, labelSelector]);
  return state;
}

// A websocket to a KubeVirt console subresource; the token rides in a subprotocol, as with kube-apiserver.
export function consoleSocket(ns, vmi, kind, protocol = 'plain.kubevirt.io') {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${location.host}/apis/subresources.kubevirt.io/v1/namespaces/${ns}/virtualmachineinstances/${vmi}/${kind}`;
  return { url, protocols: [protocol, tokenProtocol()] };
}

export function tokenProtocol() {
  const b64 = btoa(unescape(encodeURIComponent(getToken()))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return `base64url.bearer.authorization.k8s.io.${b64}`;
}

export function age(ts) {
  if (!ts) return '';
  const s = Math.max(0, (Date.now() - new Date(ts).getTime()) / 1000);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

// CDI's upload: an UploadTokenRequest for the volume, then the image body POSTed to the upload proxy (served by the
// API server under /v1beta1/upload) with that token, as `virtctl image-upload` does. XMLHttpRequest rather than
// fetch because only it reports upload progress; onProgress(sent, total).
export async function uploadImage(namespace, pvcName, file, onProgress) {
  const req = { apiVersion: 'upload.cdi.kubevirt.io/v1beta1', kind: 'UploadTokenRequest',
    metadata: { name: pvcName, namespace }, spec: { pvcName } };
  const out = await request('POST', `/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/${namespace}/uploadtokenrequests`, req);
  const token = out && out.status && out.status.token;
  if (!token) throw new ApiError(500, { message: 'the API server answered the UploadTokenRequest without a token' });
  await new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1beta1/upload');
    xhr.setRequestHeader('Authorization', `Bearer ${token}`);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => (xhr.status === 200 ? resolve()
      : reject(new ApiError(xhr.status, { message: `upload failed (HTTP ${xhr.status}): ${xhr.responseText || 'no reason given'}` })));
    xhr.onerror = () => reject(new ApiError(0, { message: 'the upload was interrupted' }));
    xhr.send(file);
  });
  onProgress(file.size, file.size);
}

// Resolves with the object once `predicate(obj)` holds, following a watch of that one object (no polling);
// rejects after timeoutMs with `what` in the message.
export function waitForObject(res, namespace, name, predicate, timeoutMs, what) {
  return new Promise((resolve, reject) => {
    const ctrl = new AbortController();
    const timer = setTimeout(() => { ctrl.abort(); reject(new ApiError(0, { message: `timed out waiting for ${what}` })); },
      timeoutMs);
    listAndWatch(resourcePath(res, namespace), { fieldSelector: `metadata.name=${name}` }, ctrl.signal, (m) => {
      const obj = m.get(`${namespace || ''}/${name}`) || Array.from(m.values())[0];
      if (obj && predicate(obj)) { clearTimeout(timer); ctrl.abort(); resolve(obj); }
    }, () => {});
  });
}

// ---- what the logged-in user may do: SelfSubjectRulesReview per namespace, cached for a minute (RBAC changes
// reach the console within that), shared by every page. Until a namespace's rules arrive everything looks
// allowed (the server decides anyway); a server without the review API leaves everything allowed.
const rulesCache = new Map(); // namespace -> {at, rules|null, loading}
const rulesListeners = new Set();
const RULES_TTL_MS = 60_000;

function loadRules(namespace) {
  const entry = rulesCache.get(namespace) || { at: 0, rules: null };
  if (entry.loading) return;
  rulesCache.set(namespace, { ...entry, loading: true });
  const body = { apiVersion: 'authorization.k8s.io/v1', kind: 'SelfSubjectRulesReview', spec: { namespace } };
  request('POST', '/apis/authorization.k8s.io/v1/selfsubjectrulesreviews', body)
    .then((out) => ((out && out.status && out.status.resourceRules) || []))
    .catch(() => null)
    .then((rules) => {
      rulesCache.set(namespace, { at: Date.now(), rules, loading: false });
      for (const fn of rulesListeners) fn();
    });
}

const matches = (list, value) => (list || []).some((x) => x === '*' || x === value);

// Whether RBAC resource rules allow `verb` on group/resource (resource may be "plural/subresource").
export function rulesAllow(rules, verb, group, resource) {
  return rules.some((r) => !(r.resourceNames && r.resourceNames.length) && matches(r.verbs, verb)
    && matches(r.apiGroups, group)
    && (matches(r.resources, resource) || (resource.includes('/') && (r.resources || []).includes(`${resource.split('/')[0]}/*`))));
}

// can(namespace, verb, group, resource) for the logged-in user; re-renders the caller when rules arrive.
export function usePermissions() {
  const [, bump] = useState(0);
  useEffect(() => {
    const fn = () => bump((x) => x + 1);
    rulesListeners.add(fn);
    return () => rulesListeners.delete(fn);
  }, []);
  return (namespace, verb, group, resource) => {
    const ns = namespace || '';
    const entry = rulesCache.get(ns);
    if (!entry || (!entry.loading && Date.now() - entry.at > RULES_TTL_MS)) loadRules(ns);
    if (!entry || !entry.rules) return true;
    return rulesAllow(entry.rules, verb, group, resource);
  };
}
