// The VM actions that need more than a confirmation: migrate (with a target node), clone (with a target name)
// and the `virtctl ssh` command line. Each creates the same object or prints the same command a CLI user would.
import { useState } from 'react';
import {
  Alert, Button, ClipboardCopy, Form, FormGroup, FormHelperText, FormSelect, FormSelectOption, HelperText,
  HelperTextItem, Modal, ModalBody, ModalFooter, ModalHeader, TextInput,
} from '@patternfly/react-core';
import { R, request, resourcePath, useWatch } from '../api.js';
import { ErrorAlert, condition, migratable, nodeReady } from './common.jsx';

const HOSTNAME = 'kubernetes.io/hostname';
const SCHEDULABLE = 'kubevirt.io/schedulable';

function fieldError(error, field) {
  const c = error && (error.causes || []).find((x) => (x.field || '').endsWith(field));
  return c ? c.message : '';
}

// Nodes a migration target pod could land on: Ready, not cordoned, schedulable for VMs, not the source.
export function migrationTargets(nodes, source) {
  return nodes.filter((n) => n.metadata.name !== source && nodeReady(n) && !(n.spec && n.spec.unschedulable)
    && (n.metadata.labels || {})[SCHEDULABLE] === 'true').map((n) => n.metadata.name).sort();
}

function MigrationProgress({ namespace, name }) {
  const w = useWatch(R.migrations, { namespace, name });
  const m = w.items[0];
  if (!m) return <p>Waiting for {name}…</p>;
  const st = m.status || {};
  const ms = st.migrationState || {};
  const failed = st.phase === 'Failed';
  return (
    <Alert isInline variant={failed ? 'danger' : st.phase === 'Succeeded' ? 'success' : 'info'} data-testid="migration-progress"
      data-phase={st.phase || ''} title={`Migration ${name}: ${st.phase || 'Pending'}`}>
      {ms.sourceNode && <p>{ms.sourceNode} → {ms.targetNode || '…'}{ms.mode ? ` (${ms.mode})` : ''}</p>}
      {failed && <p>{ms.failureReason || (condition(m, 'Failed') || {}).message}</p>}
      <p><a href="#/migrations">All migrations</a></p>
    </Alert>
  );
}

export function MigrateModal({ vm, vmi, onClose }) {
  const { namespace, name } = vm.metadata;
  const nodes = useWatch(R.nodes);
  const [node, setNode] = useState('');
  const [created, setCreated] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const source = (vmi && vmi.status && vmi.status.nodeName) || '';
  const targets = migrationTargets(nodes.items, source);
  const m = migratable(vmi);
  const hostname = (n) => {
    const o = nodes.items.find((x) => x.metadata.name === n);
    return ((o && o.metadata.labels) || {})[HOSTNAME] || n;
  };
  const submit = async () => {
    setBusy(true); setError(null);
    // what `virtctl migrate` creates; a chosen node is KubeVirt's addedNodeSelector on the target pod
    const body = {
      apiVersion: 'kubevirt.io/v1', kind: 'VirtualMachineInstanceMigration',
      metadata: { generateName: `${name}-migration-`, namespace },
      spec: { vmiName: name, ...(node ? { addedNodeSelector: { [HOSTNAME]: hostname(node) } } : {}) },
    };
    try {
      const res = await request('POST', resourcePath(R.migrations, namespace), body);
      setCreated(res.metadata.name);
    } catch (e) { setError(e); }
    setBusy(false);
  };
  return (
    <Modal isOpen variant="small" onClose={onClose} aria-labelledby="migrate-title">
      <ModalHeader title={`Migrate ${name}`} labelId="migrate-title" />
      <ModalBody>
        {!m.ok && !created && <Alert isInline variant="warning" title="This VM cannot be live-migrated now" data-testid="migrate-reason">{m.reason}</Alert>}
        <p>Running on <b>{source || '—'}</b>.</p>
        <Form onSubmit={(e) => e.preventDefault()}>
          <FormGroup label="Target node" fieldId="migrate-node">
            <FormSelect id="migrate-node" value={node} onChange={(_e, v) => setNode(v)} aria-label="Target node" isDisabled={Boolean(created)}>
              <FormSelectOption value="" label="Any other node (the scheduler chooses)" />
              {targets.map((n) => <FormSelectOption key={n} value={n} label={n} />)}
            </FormSelect>
            <FormHelperText><HelperText><HelperTextItem>
              {nodes.loaded && targets.length === 0
                ? 'No other Ready, schedulable node is listed: a live migration needs one, so the server will likely fail it.'
                : `${targets.length} other schedulable node${targets.length === 1 ? '' : 's'}.`}
            </HelperTextItem></HelperText></FormHelperText>
          </FormGroup>
        </Form>
        <ErrorAlert error={error} title="The migration was refused" />
        {created && <MigrationProgress namespace={namespace} name={created} />}
      </ModalBody>
      <ModalFooter>
        {!created && (
          <Button variant="primary" onClick={submit} isLoading={busy}
            isDisabled={busy || !m.ok}>Migrate</Button>
        )}
        <Button variant="link" onClick={onClose}>{created ? 'Close' : 'Cancel'}</Button>
      </ModalFooter>
    </Modal>
  );
}

function CloneProgress({ namespace, name, target }) {
  const w = useWatch(R.clones, { namespace, name });
  const c = w.items[0];
  const st = (c && c.status) || {};
  const ready = condition(c, 'Ready') || condition(c, 'Progressing') || {};
  const phase = st.phase || 'Pending';
  return (
    <Alert isInline variant={phase === 'Failed' ? 'danger' : phase === 'Succeeded' ? 'success' : 'info'}
      data-testid="clone-progress" data-phase={phase} title={`Clone ${name}: ${phase}`}>
      {ready.message && <p>{ready.message}</p>}
      {phase === 'Succeeded' && <p><a href={`#/vms/${namespace}/${target}`}>Open {target}</a></p>}
    </Alert>
  );
}

export function CloneModal({ vm, vmi, onClose }) {
  const { namespace, name } = vm.metadata;
  const [target, setTarget] = useState(`${name}-clone`);
  const [created, setCreated] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const running = Boolean(vmi && !['Succeeded', 'Failed'].includes(vmi.status && vmi.status.phase));
  const submit = async () => {
    setBusy(true); setError(null);
    const body = {
      apiVersion: 'clone.kubevirt.io/v1beta1', kind: 'VirtualMachineClone',
      metadata: { generateName: `${name}-clone-`, namespace },
      spec: {
        source: { apiGroup: 'kubevirt.io', kind: 'VirtualMachine', name },
        target: { apiGroup: 'kubevirt.io', kind: 'VirtualMachine', name: target.trim() },
      },
    };
    try {
      const res = await request('POST', resourcePath(R.clones, namespace), body);
      setCreated(res.metadata.name);
    } catch (e) { setError(e); }
    setBusy(false);
  };
  const targetError = fieldError(error, 'target.name');
  return (
    <Modal isOpen variant="small" onClose={onClose} aria-labelledby="clone-title">
      <ModalHeader title={`Clone ${name}`} labelId="clone-title" />
      <ModalBody>
        {running && !created && (
          <Alert isInline variant="info" title="The source VM is running">
            Only a stopped VM can be cloned: the clone waits until {name} is stopped.
          </Alert>
        )}
        <Form onSubmit={(e) => { e.preventDefault(); if (!created) submit(); }}>
          <FormGroup label="Name of the new VirtualMachine" isRequired fieldId="clone-target">
            <TextInput id="clone-target" value={target} onChange={(_e, v) => setTarget(v)} isDisabled={Boolean(created)}
              validated={targetError ? 'error' : 'default'} aria-label="Name of the new VirtualMachine" />
            {targetError && <FormHelperText><HelperText><HelperTextItem variant="error">{targetError}</HelperTextItem></HelperText></FormHelperText>}
          </FormGroup>
        </Form>
        {error && !targetError && <ErrorAlert error={error} title="The clone was refused" />}
        {created && <CloneProgress namespace={namespace} name={created} target={target.trim()} />}
      </ModalBody>
      <ModalFooter>
        {!created && <Button variant="primary" onClick={submit} isLoading={busy} isDisabled={busy || !target.trim()}>Clone</Button>}
        <Button variant="link" onClick={onClose}>{created ? 'Close' : 'Cancel'}</Button>
      </ModalFooter>
    </Modal>
  );
}

// The user cloud-init creates (`user:` or the first `users:` entry's name), the one to log in as.
export function cloudInitUser(vm) {
  const vols = (vm.spec && vm.spec.template && vm.spec.template.spec && vm.spec.template.spec.volumes) || [];
  for (const v of vols) {
    const ci = v.cloudInitNoCloud || v.cloudInitConfigDrive;
    const ud = (ci && ci.userData) || '';
    const m = ud.match(/^user:\s*["']?([a-z_][-a-z0-9_]*)/m) || ud.match(/^users:\s*\n\s*-\s*(?:name:\s*)?["']?([a-z_][-a-z0-9_]*)/m);
    if (m && m[1] !== 'default') return m[1];
  }
  return '';
}

export const sshCommand = (namespace, name, user) => `virtctl ssh -n ${namespace} ${user ? `${user}@` : ''}vm/${name}`;

export function SSHModal({ vm, onClose }) {
  const { namespace, name } = vm.metadata;
  const [user, setUser] = useState(cloudInitUser(vm) || 'root');
  const cmd = sshCommand(namespace, name, user.trim());
  return (
    <Modal isOpen variant="small" onClose={onClose} aria-labelledby="ssh-title">
      <ModalHeader title={`SSH to ${name}`} labelId="ssh-title" />
      <ModalBody>
        <Form onSubmit={(e) => e.preventDefault()}>
          <FormGroup label="User" fieldId="ssh-user">
            <TextInput id="ssh-user" value={user} onChange={(_e, v) => setUser(v)} aria-label="SSH user" />
          </FormGroup>
          <FormGroup label="Command" fieldId="ssh-command">
            <ClipboardCopy isReadOnly data-testid="ssh-command">{cmd}</ClipboardCopy>
          </FormGroup>
        </Form>
      </ModalBody>
      <ModalFooter><Button variant="link" onClick={onClose}>Close</Button></ModalFooter>
    </Modal>
  );
}

export function ActionDialog({ action, vm, vmi, onClose }) {
  if (action === 'migrate') return <MigrateModal vm={vm} vmi={vmi} onClose={onClose} />;
  if (action === 'clone') return <CloneModal vm={vm} vmi={vmi} onClose={onClose} />;
  if (action === 'ssh') return <SSHModal vm={vm} onClose={onClose} />;
  return null;
}
