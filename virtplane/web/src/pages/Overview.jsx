import { Card, CardBody, CardTitle, Gallery, Label, PageSection, Title } from '@patternfly/react-core';
import { R, useWatch } from '../api.js';
import { EventsTable } from './VMDetails.jsx';
import { StatusLabel, nodeReady, vmStatus } from './common.jsx';

function Stat({ title, children }) {
  return <Card isCompact><CardTitle>{title}</CardTitle><CardBody>{children}</CardBody></Card>;
}

export function Overview() {
  const nodes = useWatch(R.nodes);
  const vms = useWatch(R.vms);
  const migrations = useWatch(R.migrations);
  const pvcs = useWatch(R.pvcs);
  const events = useWatch(R.events);
  const byState = {};
  for (const vm of vms.items) byState[vmStatus(vm)] = (byState[vmStatus(vm)] || 0) + 1;
  const running = migrations.items.filter((m) => !['Succeeded', 'Failed'].includes(m.status && m.status.phase));
  const ready = nodes.items.filter(nodeReady).length;
  const cordoned = nodes.items.filter((n) => n.spec && n.spec.unschedulable).length;
  const storage = pvcs.items.reduce((acc, p) => acc + parseQuantity(p.status && p.status.capacity && p.status.capacity.storage), 0);
  return (
    <PageSection>
      <Title headingLevel="h1">Overview</Title>
      <Gallery hasGutter minWidths={{ default: '240px' }} style={{ marginTop: 16 }}>
        <Stat title="Nodes"><b>{nodes.items.length}</b> nodes: {ready} ready, {cordoned} cordoned</Stat>
        <Stat title="VirtualMachines">
          <b>{vms.items.length}</b>{' '}
          {Object.entries(byState).map(([s, n]) => <span key={s} style={{ marginRight: 4 }}><StatusLabel status={s} /> {n}</span>)}
        </Stat>
        <Stat title="Migrations"><b>{running.length}</b> running</Stat>
        <Stat title="Storage"><b>{pvcs.items.length}</b> PVCs, {(storage / 2 ** 30).toFixed(1)} GiB</Stat>
      </Gallery>
      <Title headingLevel="h2" style={{ marginTop: 24 }}>Recent events {events.loaded && <Label isCompact>{events.items.length}</Label>}</Title>
      <EventsTable events={events.items} />
    </PageSection>
  );
}

const UNITS = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, k: 1e3, M: 1e6, G: 1e9, T: 1e12 };
function parseQuantity(q) {
  if (!q) return 0;
  const m = /^([0-9.]+)([A-Za-z]*)$/.exec(String(q));
  return m ? Number(m[1]) * (UNITS[m[2]] || 1) : 0;
}
