import { useState } from 'react';
import { Alert, Button, Label, PageSection, Title } from '@patternfly/react-core';
import { Table, Tbody, Td, Th, Thead, Tr } from '@patternfly/react-table';
import { R, age, request, resourcePath, useWatch } from '../api.js';
import { ErrorAlert, nodeReady } from './common.jsx';
import { DrainModal, LogsModal } from './Operations.jsx';

// A live list of one resource: columns are [title, (obj) => cell].
export function ResourceList({ title, res, columns, limit = 500, rowProps }) {
  const w = useWatch(res);
  const items = [...w.items].sort((a, b) => `${a.metadata.namespace || ''}/${a.metadata.name}`
    .localeCompare(`${b.metadata.namespace || ''}/${b.metadata.name}`));
  return (
    <div style={{ marginBottom: 24 }}>
      <Title headingLevel="h2">{title} {w.loaded && <Label isCompact>{items.length}</Label>}</Title>
      {w.error && w.error.code === 404 ? <Alert variant="info" isInline title={`${title}: not served by this cluster`} />
        : <ErrorAlert error={w.error} />}
      <Table aria-label={title} variant="compact">
        <Thead><Tr>{columns.map(([c]) => <Th key={c}>{c}</Th>)}</Tr></Thead>
        <Tbody>
          {items.slice(0, limit).map((o) => (
            <Tr key={`${o.metadata.namespace}/${o.metadata.name}`} {...(rowProps ? rowProps(o) : {})}>
              {columns.map(([c, fn]) => <Td key={c} dataLabel={c}>{fn(o)}</Td>)}
            </Tr>
          ))}
          {w.loaded && items.length === 0 && <Tr><Td colSpan={columns.length}>None</Td></Tr>}
        </Tbody>
      </Table>
      {items.length > limit && <p>Showing {limit} of {items.length}.</p>}
    </div>
  );
}

const name = ['Name', (o) => o.metadata.name];
const ns = ['Namespace', (o) => o.metadata.namespace];
const created = ['Age', (o) => age(o.metadata.creationTimestamp)];

const MIGRATION_COLORS = { Succeeded: 'green', Failed: 'red', Running: 'blue', Pending: 'grey', Scheduling: 'blue',
  Scheduled: 'blue', PreparingTarget: 'blue', TargetReady: 'blue' };
const mstate = (o) => (o.status && o.status.migrationState) || {};
const clock = (ts) => (ts ? new Date(ts).toLocaleTimeString() : '');

// Progress as the controller reports it: the phase, and status.migrationState (nodes, mode, start/end, reason).
export const Migrations = () => (
  <PageSection>
    <Title headingLevel="h1">Migrations</Title>
    <ResourceList title="VirtualMachineInstanceMigrations" res={R.migrations} rowProps={(o) => ({ 'data-migration': o.metadata.name,
      'data-vmi': o.spec && o.spec.vmiName, 'data-phase': (o.status && o.status.phase) || '' })} columns={[
      name, ns, ['VMI', (o) => o.spec && o.spec.vmiName],
      ['Phase', (o) => <Label color={MIGRATION_COLORS[o.status && o.status.phase] || 'grey'}>{(o.status && o.status.phase) || 'Pending'}</Label>],
      ['Source node', (o) => mstate(o).sourceNode],
      ['Target node', (o) => mstate(o).targetNode || ((o.spec && o.spec.addedNodeSelector && Object.values(o.spec.addedNodeSelector).join(',')) ? `(asked: ${Object.values(o.spec.addedNodeSelector).join(',')})` : '')],
      ['Mode', (o) => mstate(o).mode], ['Started', (o) => clock(mstate(o).startTimestamp)],
      ['Ended', (o) => clock(mstate(o).endTimestamp)],
      ['Reason', (o) => mstate(o).failureReason || ''], created,
      ['', (o) => (o.status && !['Succeeded', 'Failed'].includes(o.status.phase) ? (
        <Button variant="link" isDanger onClick={() => request('DELETE', resourcePath(R.migrations, o.metadata.namespace, o.metadata.name))}>
          Cancel
        </Button>) : null)],
    ]} />
  </PageSection>
);

export const Storage = () => (
  <PageSection>
    <Title headingLevel="h1">Storage</Title>
    <ResourceList title="DataVolumes" res={R.dataVolumes} columns={[
      name, ns, ['Phase', (o) => o.status && o.status.phase], ['Progress', (o) => o.status && o.status.progress],
      ['Source', (o) => Object.keys((o.spec && o.spec.source) || {}).join(',')], created]} />
    <ResourceList title="PersistentVolumeClaims" res={R.pvcs} columns={[
      name, ns, ['Status', (o) => o.status && o.status.phase],
      ['Capacity', (o) => o.status && o.status.capacity && o.status.capacity.storage],
      ['Storage class', (o) => o.spec && o.spec.storageClassName], created]} />
    <ResourceList title="StorageClasses" res={R.storageClasses} columns={[
      name, ['Provisioner', (o) => o.provisioner], ['Default', (o) => ((o.metadata.annotations || {})['storageclass.kubernetes.io/is-default-class'] === 'true' ? 'yes' : '')],
      ['Binding mode', (o) => o.volumeBindingMode]]} />
    <ResourceList title="StorageProfiles" res={R.storageProfiles} columns={[
      name, ['Claim property sets', (o) => JSON.stringify((o.status && o.status.claimPropertySets) || [])]]} />
  </PageSection>
);


export function Nodes() {
  const [drain, setDrain] = useState('');
  return (
    <PageSection>
      <Title headingLevel="h1">Nodes</Title>
      <ResourceList title="Nodes" res={R.nodes} rowProps={(o) => ({ 'data-node': o.metadata.name })} columns={[
        name, ['Status', (o) => <Label color={nodeReady(o) ? 'green' : 'red'}>{nodeReady(o) ? 'Ready' : 'NotReady'}</Label>],
        ['Schedulable', (o) => (o.spec && o.spec.unschedulable ? 'Cordoned' : 'Yes')],
        ['Address', (o) => ((o.status && o.status.addresses) || []).map((a) => a.address).join(', ')],
        ['CPU', (o) => o.status && o.status.allocatable && o.status.allocatable.cpu],
        ['Memory', (o) => o.status && o.status.allocatable && o.status.allocatable.memory], created,
        ['', (o) => (
          <>
            <Button variant="link" onClick={() => request('PATCH', resourcePath(R.nodes, null, o.metadata.name),
              { spec: { unschedulable: !(o.spec && o.spec.unschedulable) } }, 'application/merge-patch+json')}>
              {o.spec && o.spec.unschedulable ? 'Uncordon' : 'Cordon'}
            </Button>
            <Button variant="link" isDanger onClick={() => setDrain(o.metadata.name)}>Drain</Button>
          </>)],
      ]} />
      {drain && <DrainModal node={drain} onClose={() => setDrain('')} />}
    </PageSection>
  );
}

export function Pods() {
  const [logs, setLogs] = useState(null);
  return (
    <PageSection>
      <Title headingLevel="h1">Pods</Title>
      <ResourceList title="Pods" res={R.pods} rowProps={(o) => ({ 'data-pod': o.metadata.name })} columns={[
        name, ns, ['Phase', (o) => o.status && o.status.phase], ['Node', (o) => o.spec && o.spec.nodeName],
        ['IP', (o) => o.status && o.status.podIP], created,
        ['', (o) => <Button variant="link" onClick={() => setLogs(o)}>Logs</Button>]]} />
      <ResourceList title="Deployments" res={R.deployments} columns={[
        name, ns, ['Ready', (o) => `${(o.status && o.status.readyReplicas) || 0}/${(o.spec && o.spec.replicas) || 0}`], created]} />
      {logs && <LogsModal pod={logs} onClose={() => setLogs(null)} />}
    </PageSection>
  );
}
