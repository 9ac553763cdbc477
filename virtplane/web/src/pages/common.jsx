import { useState } from 'react';
import { Alert, AlertActionCloseButton, Button, Label, Modal, ModalBody, ModalFooter, ModalHeader } from '@patternfly/react-core';
import { vmAction, request, resourcePath, R } from '../api.js';

const COLORS = {
  Running: 'green', Stopped: 'grey', Paused: 'orange', Migrating: 'purple', Starting: 'blue', Stopping: 'blue',
  Provisioning: 'blue', Terminating: 'blue', WaitingForVolumeBinding: 'blue',
  CrashLoopBackOff: 'red', ErrorUnschedulable: 'red', ErrImagePull: 'red', ImagePullBackOff: 'red',
  ErrorPvcNotFound: 'red', DataVolumeError: 'red', Unknown: 'orange',
};

export const StatusLabel = ({ status }) => (
  <Label color={COLORS[status] || 'grey'} data-status={status}>{status || 'Unknown'}</Label>
);

export const vmStatus = (vm) => (vm.status && vm.status.printableStatus) || 'Stopped';

export function isRunning(vm, vmi) {
  return Boolean(vmi && !['Succeeded', 'Failed'].includes(vmi.status && vmi.status.phase) && !vmi.metadata.deletionTimestamp);
}

// Which actions the server would accept now (it answers 409 otherwise).
const SUB = 'subresources.kubevirt.io';
// The RBAC check behind each action: (verb, API group, resource) as the server authorizes the request.
export const ACTION_PERMISSIONS = {
  start: ['update', SUB, 'virtualmachines/start'],
  stop: ['update', SUB, 'virtualmachines/stop'],
  forcestop: ['update', SUB, 'virtualmachines/stop'],
  restart: ['update', SUB, 'virtualmachines/restart'],
  pause: ['update', SUB, 'virtualmachineinstances/pause'],
  unpause: ['update', SUB, 'virtualmachineinstances/unpause'],
  delete: ['delete', 'kubevirt.io', 'virtualmachines'],
  migrate: ['create', 'kubevirt.io', 'virtualmachineinstancemigrations'],
  clone: ['create', 'clone.kubevirt.io', 'virtualmachineclones'],
  console: ['get', SUB, 'virtualmachineinstances/console'],
};

// What the server would accept for this VM now: its state, and (with `can` from usePermissions) the user's RBAC.
export function allowedActions(vm, vmi, can) {
  const byState = stateActions(vm, vmi);
  if (!can) return byState;
  const out = {};
  for (const [a, ok] of Object.entries(byState)) {
    const perm = ACTION_PERMISSIONS[a];
    out[a] = ok && (!perm || can(vm.metadata.namespace, ...perm));
  }
  out.console = byState.restart && can(vm.metadata.namespace, ...ACTION_PERMISSIONS.console);
  return out;
}

function stateActions(vm, vmi) {
  const running = isRunning(vm, vmi);
  const paused = Boolean(vmi && ((vmi.status && vmi.status.conditions) || []).some((c) => c.type === 'Paused' && c.status === 'True'));
  const strategy = (vm.spec && vm.spec.runStrategy) || (vm.spec && vm.spec.running ? 'Always' : 'Halted');
  return {
    start: !running && !vm.metadata.deletionTimestamp,
    stop: running || strategy === 'Always' || strategy === 'RerunOnFailure',
    restart: running,
    forcestop: running,
    pause: running && !paused && vmi.status && vmi.status.phase === 'Running',
    unpause: paused,
    delete: !vm.metadata.deletionTimestamp,
    migrate: migratable(vmi).ok,
    clone: !vm.metadata.deletionTimestamp,
    ssh: true,
  };
}

export const condition = (obj, type) => ((obj && obj.status && obj.status.conditions) || []).find((c) => c.type === type);
export const nodeReady = (o) => { const c = condition(o, 'Ready'); return c ? c.status === 'True' : false; };

// Whether the server would start a live migration of this VMI now, and the reason when not: it must be Running
// and its LiveMigratable condition True (the controller fails the migration otherwise, with that message).
export function migratable(vmi) {
  if (!vmi || !vmi.status || vmi.status.phase !== 'Running' || vmi.metadata.deletionTimestamp) {
    return { ok: false, reason: 'The VM is not running.' };
  }
  const ms = vmi.status.migrationState;
  if (ms && ms.migrationUid && !ms.completed && !ms.failed) {
    return { ok: false, reason: `A migration is in progress (to ${ms.targetNode || 'another node'}).` };
  }
  const c = condition(vmi, 'LiveMigratable');
  if (!c) return { ok: false, reason: 'The server has not yet reported whether this VM is live-migratable.' };
  if (c.status !== 'True') return { ok: false, reason: c.message || c.reason || 'The VM is not live-migratable.' };
  return { ok: true, reason: '' };
}

export const ACTION_LABELS = {
  start: 'Start', stop: 'Stop', forcestop: 'Force stop', restart: 'Restart', pause: 'Pause', unpause: 'Unpause', delete: 'Delete',
  migrate: 'Migrate', clone: 'Clone', ssh: 'Copy virtctl ssh command',
};

// Actions that open their own dialog (VMActions.jsx) rather than a plain confirmation.
export const DIALOG_ACTIONS = ['migrate', 'clone', 'ssh'];

export async function runAction(action, vm) {
  const { namespace, name } = vm.metadata;
  if (action === 'forcestop') {
    // KubeVirt's `virtctl stop --force --grace-period 0`: the VMI is killed without waiting for the guest
    return request('PUT', `/apis/subresources.kubevirt.io/v1/namespaces/${namespace}/virtualmachines/${name}/stop`,
      { gracePeriod: 0 });
  }
  if (action === 'delete') return request('DELETE', resourcePath(R.vms, namespace, name));
  if (action === 'pause' || action === 'unpause') {
    return request('PUT', `/apis/subresources.kubevirt.io/v1/namespaces/${namespace}/virtualmachineinstances/${name}/${action}`, {});
  }
  return vmAction(namespace, name, action);
}

export function ConfirmModal({ title, body, confirmLabel, danger, onConfirm, onClose }) {
  const [busy, setBusy] = useState(false);
  return (
    <Modal isOpen variant="small" onClose={onClose} aria-labelledby="confirm-title">
      <ModalHeader title={title} labelId="confirm-title" />
      <ModalBody>{body}</ModalBody>
      <ModalFooter>
        <Button variant={danger ? 'danger' : 'primary'} isDisabled={busy} isLoading={busy}
          onClick={async () => { setBusy(true); try { await onConfirm(); } finally { setBusy(false); } }}>
          {confirmLabel}
        </Button>
        <Button variant="link" onClick={onClose}>Cancel</Button>
      </ModalFooter>
    </Modal>
  );
}

export function ErrorAlert({ error, title, onClose }) {
  if (!error) return null;
  const causes = error.causes || [];
  return (
    <Alert variant="danger" isInline title={title || error.message}
      actionClose={onClose ? <AlertActionCloseButton onClose={onClose} /> : undefined}>
      {title && <p>{error.message}</p>}
      {causes.length > 0 && (
        <ul>{causes.map((c, i) => <li key={i}>{c.field ? <code>{c.field}</code> : null} {c.message}</li>)}</ul>
      )}
    </Alert>
  );
}

export function vmiIPs(vmi) {
  const ifs = (vmi && vmi.status && vmi.status.interfaces) || [];
  const ips = [];
  for (const i of ifs) {
    for (const ip of i.ipAddresses || (i.ipAddress ? [i.ipAddress] : [])) if (!ips.includes(ip)) ips.push(ip);
  }
  return ips;
}

export function trueConditions(obj) {
  return ((obj.status && obj.status.conditions) || []).filter((c) => c.status === 'True').map((c) => c.type);
}
