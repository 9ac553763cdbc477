// Node drain and pod logs, through the same API calls kubectl makes.
import { useEffect, useRef, useState } from 'react';
import {
  Alert, Button, FormSelect, FormSelectOption, Label, Modal, ModalBody, ModalFooter, ModalHeader, Toolbar,
  ToolbarContent, ToolbarItem,
} from '@patternfly/react-core';
import { ApiError, R, getText, request, resourcePath, useWatch } from '../api.js';
import { ErrorAlert } from './common.jsx';

const RETRY_MS = 5000; // kubectl drain retries a refused (429) eviction every 5 s
const DRAIN_TIMEOUT_MS = 15 * 60 * 1000;

const ownedByDaemonSet = (p) => (p.metadata.ownerReferences || []).some((o) => o.kind === 'DaemonSet');
const mirrorPod = (p) => Boolean((p.metadata.annotations || {})['kubernetes.io/config.mirror']);
// What `kubectl drain --ignore-daemonsets` evicts: every pod on the node but DaemonSet and mirror pods.
export const evictable = (p) => !ownedByDaemonSet(p) && !mirrorPod(p);

function evict(pod) {
  const { namespace, name } = pod.metadata;
  return request('POST', resourcePath(R.pods, namespace, name, 'eviction'), {
    apiVersion: 'policy/v1', kind: 'Eviction', metadata: { name, namespace },
  });
}

// Cordon, then evict each pod until none is left: a VM's launcher pod answers 429 while its VM is
// live-migrated away (evictionStrategy LiveMigrate), so it is retried, as kubectl drain does.
export function DrainModal({ node, onClose }) {
  const pods = useWatch(R.pods, { fieldSelector: `spec.nodeName=${node}` });
  const latest = useRef(pods);
  latest.current = pods;
  const [phase, setPhase] = useState('confirm'); // confirm, draining, done, failed, cancelled
  const [results, setResults] = useState({}); // ns/name → last answer
  const [error, setError] = useState(null);
  const stop = useRef(false);
  useEffect(() => () => { stop.current = true; }, []);
  const todo = pods.items.filter(evictable);
  const run = async () => {
    setPhase('draining'); setError(null);
    stop.current = false;
    try {
      await request('PATCH', resourcePath(R.nodes, null, node), { spec: { unschedulable: true } }, 'application/merge-patch+json');
      const deadline = Date.now() + DRAIN_TIMEOUT_MS;
      for (;;) {
        if (stop.current) { setPhase('cancelled'); return; }
        const left = latest.current.items.filter(evictable);
        if (latest.current.loaded && left.length === 0) { setPhase('done'); return; }
        if (Date.now() > deadline) throw new Error(`drain of ${node} timed out with ${left.length} pods left`);
        const answers = await Promise.all(left.map(async (p) => {
          const key = `${p.metadata.namespace}/${p.metadata.name}`;
          if (p.metadata.deletionTimestamp) return [key, 'terminating'];
          try {
            await evict(p);
            return [key, 'evicted'];
          } catch (e) {
            if (e.code === 404) return [key, 'gone'];
            if (e.code === 429) return [key, `waiting: ${e.message}`];
            throw new ApiError(e.code, { ...e.status, message: `evicting ${key}: ${e.message}` });
          }
        }));
        // each pod's distinct answers in order: "waiting: … evacuation … → evicted"
        setResults((r) => {
          const n = { ...r };
          for (const [k, a] of answers) if (!(n[k] || []).includes(a)) n[k] = [...(n[k] || []), a];
          return n;
        });
        await new Promise((res) => setTimeout(res, RETRY_MS));
      }
    } catch (e) {
      setError(e);
      setPhase('failed');
    }
  };
  const color = { done: 'green', failed: 'red', draining: 'blue', cancelled: 'orange' }[phase];
  return (
    <Modal isOpen variant="medium" onClose={onClose} aria-labelledby="drain-title">
      <ModalHeader title={`Drain ${node}?`} labelId="drain-title" />
      <ModalBody>
        <p>
          Cordon {node} (no new pods or VMs land on it), then evict its pods as <code>kubectl drain --ignore-daemonsets</code> does:
          VMs with evictionStrategy LiveMigrate are live-migrated to another node; others are shut down and restarted
          elsewhere as their run strategy says.
        </p>
        {phase !== 'confirm' && <p>Drain: <Label color={color} data-testid="drain-phase">{phase}</Label></p>}
        <ErrorAlert error={error} title="The drain stopped" />
        <ul data-testid="drain-pods">
          {todo.map((p) => {
            const key = `${p.metadata.namespace}/${p.metadata.name}`;
            return <li key={key}>{key}{results[key] ? ` — ${results[key].join(' → ')}` : ''}</li>;
          })}
          {Object.keys(results).filter((k) => !todo.some((p) => `${p.metadata.namespace}/${p.metadata.name}` === k)).map((k) => (
            <li key={k}>{k} — {[...results[k], 'gone from the node'].join(' → ')}</li>
          ))}
          {pods.loaded && todo.length === 0 && Object.keys(results).length === 0 && <li>No pods to evict.</li>}
        </ul>
      </ModalBody>
      <ModalFooter>
        {phase === 'confirm' && <Button variant="danger" onClick={run}>Drain</Button>}
        {phase === 'draining' && <Button variant="secondary" onClick={() => { stop.current = true; }}>Stop</Button>}
        <Button variant="link" onClick={onClose}>{phase === 'confirm' ? 'Cancel' : 'Close'}</Button>
      </ModalFooter>
    </Modal>
  );
}

// A pod's container log (pods/log), the last lines or all of it.
export function LogsModal({ pod, onClose }) {
  const { namespace, name } = pod.metadata;
  const containers = [...((pod.spec && pod.spec.initContainers) || []), ...((pod.spec && pod.spec.containers) || [])].map((c) => c.name);
  const [container, setContainer] = useState(((pod.spec && pod.spec.containers) || [])[0]?.name || containers[0] || '');
  const [text, setText] = useState('');
  const [error, setError] = useState(null);
  const [loading, setLoading] = useState(false);
  const load = async () => {
    setLoading(true); setError(null);
    try {
      setText(await getText(`${resourcePath(R.pods, namespace, name, 'log')}?container=${encodeURIComponent(container)}&tailLines=1000`));
    } catch (e) {
      setText(''); setError(e);
    }
    setLoading(false);
  };
  useEffect(() => { load(); }, [container]); // eslint-disable-line react-hooks/exhaustive-deps
  return (
    <Modal isOpen variant="large" onClose={onClose} aria-labelledby="logs-title">
      <ModalHeader title={`Logs of ${namespace}/${name}`} labelId="logs-title" />
      <ModalBody>
        <Toolbar><ToolbarContent>
          <ToolbarItem>
            <FormSelect value={container} onChange={(_e, v) => setContainer(v)} aria-label="Container">
              {containers.map((c) => <FormSelectOption key={c} value={c} label={c} />)}
            </FormSelect>
          </ToolbarItem>
          <ToolbarItem><Button variant="secondary" onClick={load} isLoading={loading}>Refresh</Button></ToolbarItem>
        </ToolbarContent></Toolbar>
        <ErrorAlert error={error} title="The log could not be read" />
        {!error && !loading && !text && <Alert isInline variant="info" title="The log is empty." />}
        <pre className="vp-log" data-testid="pod-log">{text}</pre>
      </ModalBody>
      <ModalFooter><Button variant="link" onClick={onClose}>Close</Button></ModalFooter>
    </Modal>
  );
}
